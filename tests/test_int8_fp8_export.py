"""The W8A8 int8 preset (layout w8a8) and the exports engines serve most: W8A8
(``int-quantized``) and FP8 (``float-quantized``), checked against compressed-tensors' own code."""

import json

import pytest
import torch

from helpers import run_cli
from qconvert import load
from qconvert.formats.safetensors_io import ShardedReader

pytest.importorskip("compressed_tensors", reason='compressed-tensors is not installed: pip install -e ".[test]"')

IDS = torch.tensor([[3, 17, 42, 5, 88, 61, 9, 30]])


def _float_logits(src):
    from qconvert.source import resolve_source

    return resolve_source(str(src)).load_model(torch.float32)(IDS).logits


@pytest.fixture(scope="module")
def w8a8_out(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a8") / "out"
    run_cli("quantize", tiny_llama, "--scheme", "w8a8", "--base", "rtn", "-o", out, "-q")
    return out


def test_w8a8_runs_close_to_float_and_verifies(w8a8_out, tiny_llama):
    qc = json.loads((w8a8_out / "config.json").read_text())["quantization_config"]
    assert set(qc["modules"].values()) == {"w8a8"} and qc["method"] == "int8"
    reader = ShardedReader(w8a8_out)
    q = reader.get("model.layers.0.self_attn.q_proj.qweight")
    assert q.dtype == torch.int8 and int(q.min()) >= -127  # the symmetric grid
    got, want = load(w8a8_out)(IDS).logits, _float_logits(tiny_llama)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    rep = json.loads(run_cli("verify", w8a8_out, "--json").stdout)
    assert rep["ok"] and rep["min_snr_db"] > 30


def test_w8a8_runtime_is_the_integer_product():
    """y = float32(Σ xq·q) · (t · s): the int32 accumulator exact, one conversion."""
    from qconvert.layouts.int8 import W8A8Linear
    from qconvert_kernels.w4a8 import reference as ref

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
    s = torch.rand(24, generator=g) * 0.01 + 1e-3
    layer = W8A8Linear({"qweight": q, "wscale": s, "shape": torch.tensor([24, 40])}, None)
    x = torch.randn(5, 40, generator=g)
    xq, t = ref.quantize_per_token_int8(x)
    acc = xq.long() @ q.long().T  # exact in int64
    want = acc.float() * (t[:, None] * s[None, :])
    assert torch.equal(layer(x), want)


def test_w8a8_gptq_beats_round_to_nearest(tiny_calib_src, tmp_path):
    from helpers import quantize_tiny

    res = quantize_tiny(tiny_calib_src, tmp_path / "out", "w8a8")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out" / "qconvert.json").read_text())["layers"]
    assert rows and all(r["gptq_loss"] <= r["rtn_loss"] for r in rows)


def _ct_scheme(dest):
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    return qc, QuantizationConfig.model_validate(qc).config_groups["group_0"]


def test_w8a8_export_is_compressed_tensors_int8(w8a8_out, tmp_path):
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    dest = tmp_path / "ct"
    res = run_cli("export", w8a8_out, "-o", dest)
    assert "W8A8" in res.output
    qc, scheme = _ct_scheme(dest)
    assert qc["format"] == "int-quantized" and json.loads((dest / "config.json").read_text())["architectures"]
    assert scheme.weights == PRESET_SCHEMES["W8A8"]["weights"]
    assert scheme.input_activations == PRESET_SCHEMES["W8A8"]["input_activations"]
    native, ct = ShardedReader(w8a8_out), ShardedReader(dest)
    for name in json.loads((w8a8_out / "config.json").read_text())["quantization_config"]["modules"]:
        q, s = native.get(f"{name}.qweight"), native.get(f"{name}.wscale")
        state = {"weight": ct.get(f"{name}.weight"), "weight_scale": ct.get(f"{name}.weight_scale")}
        assert torch.equal(state["weight"], q) and state["weight_scale"].shape == (q.shape[0], 1)
        # compressed-tensors' own decompressor reads what qconvert computes with ...
        dense = IntQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(dense.float(), q.float() * s[:, None])
        # ... and its compressor, given that weight and scale, writes the same int8 values back
        again = IntQuantizationCompressor.compress({"weight": dense.float(), "weight_scale": state["weight_scale"]}, scheme)
        assert torch.equal(again["weight"], q), name


def test_fp8_export_of_zqfp_w8a8(tiny_llama, tmp_path):
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    out, dest = tmp_path / "out", tmp_path / "ct"
    run_cli("quantize", tiny_llama, "--scheme", "zqfp-w8a8", "-o", out, "-q")
    run_cli("export", out, "-o", dest)
    qc, scheme = _ct_scheme(dest)
    assert qc["format"] == "float-quantized"
    assert scheme.weights == PRESET_SCHEMES["FP8_DYNAMIC"]["weights"]
    assert scheme.input_activations == PRESET_SCHEMES["FP8_DYNAMIC"]["input_activations"]
    native, ct = ShardedReader(out), ShardedReader(dest)
    name = "model.layers.1.mlp.down_proj"
    k = int(native.get(f"{name}.shape")[1])
    q, s = native.get(f"{name}.qweight")[:, :k], native.get(f"{name}.wscale")
    state = {"weight": ct.get(f"{name}.weight"), "weight_scale": ct.get(f"{name}.weight_scale")}
    assert state["weight"].dtype == torch.float8_e4m3fn and torch.equal(state["weight"].view(torch.uint8), q.view(torch.uint8))
    dense = FloatQuantizationCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(dense.float(), q.float() * s[:, None])
    again = FloatQuantizationCompressor.compress({"weight": dense.float(), "weight_scale": state["weight_scale"]}, scheme)
    assert torch.equal(again["weight"].view(torch.uint8), q.view(torch.uint8))


def test_fp8_with_lorc_is_refused_with_the_fix(tiny_llama, tmp_path):
    out = tmp_path / "out"
    run_cli("quantize", tiny_llama, "--scheme", "zqfp-w8a8", "--lorc-rank", 2, "-o", out, "-q")
    res = run_cli("export", out, "-o", tmp_path / "ct", ok=False)
    assert res.exit_code == 1 and "--lorc-rank 0" in res.output and not (tmp_path / "ct").exists()


def test_architectures_always_set(tmp_path, w8a8_out):
    cfg = json.loads((w8a8_out / "config.json").read_text())
    cfg["architectures"] = None  # what a GGUF source records
    other = tmp_path / "noarch"
    import shutil

    shutil.copytree(w8a8_out, other)
    (other / "config.json").write_text(json.dumps(cfg))
    run_cli("export", other, "-o", tmp_path / "ct")
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
