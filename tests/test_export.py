"""`qconvert export --format compressed-tensors`: the packing, the checkpoint, and the model
transformers builds from it, checked against qconvert's own runtime (docs/export.md)."""

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers import TEXT, tiny_config, write_model
from qconvert import load
from qconvert.cli import cli
from qconvert.formats.packing import pack_int4_words, unpack_int4_words
from qconvert.formats.packing import unpack_int4
from qconvert.formats.safetensors_io import ShardedReader
from qconvert.layouts.int4 import W4A8Linear
from qconvert_kernels.w4a8 import reference as ref

ct_pack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers",
                              reason='compressed-tensors is not installed: pip install -e ".[test]"')

# Per layer and with activation quantization off, the exported model and qconvert's runtime
# compute the same numbers in a different order (float32 sums over K against exact int32
# sums, and scales rounded once to float32): they agree to float32 rounding, a few 1e-7 of the
# output's magnitude.  TOL leaves a 20x margin and stays far below fp16's 2^-11 = 4.9e-4.
TOL = 1e-5


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def ct_quantize_per_token(x, kp=None):
    """compressed-tensors' dynamic symmetric int8 per-token quantizer, in the runtime's
    signature (xq int8 [M, Kp], t float32 [M]): step amax / 127.5 (its int8 range is
    [-128, 127], 255 steps, halved), x / step rounded half to even, clamped to [-128, 127]."""
    x = x.float()
    step = x.abs().amax(dim=-1) / 127.5
    step = torch.where(step == 0, torch.finfo(torch.float32).eps, step)
    xq = torch.clamp(x / step[:, None], -128, 127).round().to(torch.int8)
    if kp is not None and kp > xq.shape[-1]:
        xq = torch.nn.functional.pad(xq, (0, kp - xq.shape[-1]))
    return xq, step


def decoded_weight(layer: W4A8Linear) -> torch.Tensor:
    """q · scale of a runtime layer, exact in float64 (docs/format.md: q · ŝ · c / 2^a for w4a8-is)."""
    if layer.layout == "w4a8-is":
        s = layer.iscale.double() * layer.cscale.double()[:, None] * 2.0**-layer.alpha_log2
    else:
        s = layer.scales.double()
    q = layer.weights_int8().double().reshape(layer.out_features, -1, layer.group_size)
    return (q * s[..., None]).reshape(layer.out_features, -1)[:, : layer.in_features]


def quantized_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, W4A8Linear)}



def assert_layers_match_with_ct_quantizer(model, runtime):
    """Every quantized linear of ``runtime`` fed compressed-tensors' int8 quantizer gives, on the
    inputs the exported ``model`` sees, that model's output to float32 rounding."""
    layers = quantized_linears(runtime)
    _, seen = capture_linear_io(model, IDS, list(layers))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref, "quantize_per_token_int8", ct_quantize_per_token)
        for n, (x, y) in seen.items():
            assert (layers[n](x) - y).abs().max() <= TOL * y.abs().max(), n

def load_exported(path, dtype="auto"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def capture_linear_io(model, ids, names):
    """{name: (input, output)} of the named linears during one forward of ``model``."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: seen.__setitem__(n, (args[0].detach().clone(), out.detach().clone())))
        for n in names]
    try:
        logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


IDS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("shape", [(830, 545), (7, 8), (3, 1), (64, 160)])
def test_packing_matches_compressed_tensors_bit_for_bit(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(shape[1]))
    q[0, 0], q[-1, -1] = -8, 7  # both ends of the range
    ours = pack_int4_words(q)
    assert ours.dtype == torch.int32 and ours.shape == (shape[0], math.ceil(shape[1] / 8))
    assert torch.equal(ours, ct_pack.pack_to_int32(q, 4))  # compressed-tensors' own packer
    assert torch.equal(ct_pack.unpack_from_int32(ours, 4, torch.Size(shape)), q)  # and its unpacker
    assert torch.equal(unpack_int4_words(ours, shape[1]), q)


def test_packing_layout_by_hand():
    # value k of a row in bits 4(k % 8).. of word k // 8, as q + 8, low bits first
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7, -1]], dtype=torch.int8)
    words = pack_int4_words(q)
    assert words.shape == (1, 2)
    assert words[0, 0].item() == 0xFEBA9810 - 2**32  # nibbles 0,1,8,9,10,11,14,15 from the low end
    assert words[0, 1].item() == 0x7  # -1 + 8, the rest of the word zero
    with pytest.raises(ValueError, match="outside"):
        pack_int4_words(torch.tensor([[8]], dtype=torch.int8))


# ---------------------------------------------------------------- W4A8 (integer scale)


@pytest.fixture(scope="module")
def is_out(tmp_path_factory, tiny_llama):
    # K is 64 (attention, gate, up) and 160 (down): g = 32 divides both
    out = tmp_path_factory.mktemp("export") / "is"
    run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-g", 32, "-o", out, "-q")
    return out


@pytest.fixture(scope="module")
def is_ct(is_out):
    dest = is_out.parent / "is-ct"
    res = run("export", is_out, "--format", "compressed-tensors", "-o", dest)
    assert "compressed-tensors W4A8, group size 32, 14 quantized linears" in res.output
    return dest


def test_checkpoint_layout(is_out, is_ct):
    files = {p.name for p in is_ct.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "qconvert_export.json"} <= files
    assert not files & {"manifest.json", "qconvert.json"} and not any(n.startswith(".") for n in files)
    assert not [p for p in is_ct.parent.iterdir() if p.name.startswith(".is-ct")]  # no temp dirs left
    qc = json.loads((is_ct / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"] and qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                "group_size": 32, "dynamic": False}
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                          "dynamic": True}
    # compressed-tensors itself accepts the config as its W4A8 preset, group size aside
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import W4A8

    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    assert scheme.input_activations == W4A8["input_activations"]
    assert scheme.weights == W4A8["weights"].model_copy(update={"group_size": 32})

    native, ct = ShardedReader(is_out), ShardedReader(is_ct)
    modules = json.loads((is_out / "config.json").read_text())["quantization_config"]["modules"]
    for name in modules:
        n, k = (int(v) for v in native.get(f"{name}.shape"))
        packed, scale, shape = (ct.get(f"{name}.weight_{s}") for s in ("packed", "scale", "shape"))
        assert packed.dtype == torch.int32 and packed.shape == (n, k // 8)
        assert scale.dtype == torch.float32 and scale.shape == (n, k // 32)
        assert shape.tolist() == [n, k]
        # the same int4 values, read back by compressed-tensors' own unpacker
        assert torch.equal(ct_pack.unpack_from_int32(packed, 4, torch.Size([n, k])), unpack_int4(native.get(f"{name}.qweight")))
        t = {s: native.get(f"{name}.{s}") for s in ("iscale", "cscale", "alpha_log2")}
        exact = t["iscale"].double() * t["cscale"].double()[:, None] / 2.0 ** int(t["alpha_log2"][0])
        assert ((scale.double() - exact).abs() <= exact * 2.0**-24).all()  # rounded once to float32
    for name in native.keys():  # everything else unchanged
        if name.rpartition(".")[0] not in modules:
            assert torch.equal(ct.get(name), native.get(name)), name
    assert "model.embed_tokens.weight" in ct.keys() and "lm_head.weight" in ct.keys()


def test_transformers_runs_it_as_int8_activations_on_decompressed_weights(is_out, is_ct):
    """What transformers does with a W4A8 checkpoint on CPU, layer by layer on its own inputs:
    the int4 weights are decompressed to float (q · weight_scale) and every input is
    fake-quantized to int8 per token on compressed-tensors' grid (step amax / 127.5, range
    [-128, 127]).  qconvert's integer GEMM fed with that same quantizer gives the same output to
    float32 rounding; its own quantizer (step amax / 127, range [-127, 127], vLLM's too) does not."""
    model = load_exported(is_ct)
    runtime = load(is_out)
    layers = quantized_linears(runtime)
    _, seen = capture_linear_io(model, IDS, list(layers))
    assert len(seen) == 14
    for name, layer in layers.items():
        w = model.get_submodule(name).weight  # decompressed by the first forward
        assert w.dtype == torch.float32
        exact = decoded_weight(layer)
        assert ((w.double() - exact).abs() <= exact.abs() * 2.0**-22).all(), name
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref, "quantize_per_token_int8", ct_quantize_per_token)
        for name, (x, y) in seen.items():
            assert (layers[name](x) - y).abs().max() <= TOL * y.abs().max(), name
    worst_own = max(float((layers[n](x) - y).abs().max() / y.abs().max()) for n, (x, y) in seen.items())
    worst_float = max(float((torch.nn.functional.linear(x, model.get_submodule(n).weight) - y).abs().max() / y.abs().max())
                      for n, (x, y) in seen.items())
    assert worst_own > 20 * TOL  # a different int8 grid: not the same numbers
    assert worst_float > 20 * TOL  # the activations are quantized, not passed through in float


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # dequantize=True, as documented
def test_logits_match_the_runtime(is_out, is_ct):
    model = load_exported(is_ct)
    runtime = load(is_out)
    # weights and graph: with activation quantization off on both sides (decoded weights in
    # float in the runtime), the logits agree to float32 rounding
    for m in model.modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = False
    model(IDS)  # decompress
    off = model(IDS).logits
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(W4A8Linear, "forward", lambda self, x: torch.nn.functional.linear(x, decoded_weight(self).to(x.dtype)))
        ref_off = runtime(IDS).logits
    assert (off - ref_off).abs().max() <= TOL * ref_off.abs().max()
    # dequantize=True dequantizes at load and quantizes no activation at all: the same numbers
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    dense = AutoModelForCausalLM.from_pretrained(is_ct, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert (dense(IDS).logits - ref_off).abs().max() <= TOL * ref_off.abs().max()
    for m in model.modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = True
    # as shipped: int8 activations on both sides, on grids 127 / 127.5 apart, and a one-step
    # rounding difference in one activation grows block after block (see docs/export.md):
    # close, not equal
    y, y_rt = model(IDS).logits, runtime(IDS).logits
    assert (y - y_rt).abs().max() <= 0.05 * y_rt.abs().max()
    assert (y.argmax(-1) == y_rt.argmax(-1)).float().mean() >= 0.9


# ---------------------------------------------------------------- W4A16 and w4a8-fs


@pytest.mark.parametrize("scheme, preset", [("w4a16-gptq", "W4A16"), ("w4a8-fs", "W4A8")])
def test_float_scale_layouts(tmp_path, tiny_llama, scheme, preset):
    out, dest = tmp_path / "out", tmp_path / "ct"
    run("quantize", tiny_llama, "--scheme", scheme, "--base", "rtn", "-g", 32, "-o", out, "-q")
    res = run("export", out, "-o", dest)
    assert f"compressed-tensors {preset}, group size 32" in res.output
    group = json.loads((dest / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert (group["input_activations"] is None) == (preset == "W4A16")
    native, ct = ShardedReader(out), ShardedReader(dest)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(ct.get(f"{name}.weight_scale"), native.get(f"{name}.scales").float())  # fp16 -> fp32: exact
    model, runtime = load_exported(dest), load(out)
    if preset == "W4A16":  # no activation quantization: the same float weights, the same graph
        y, y_rt = model(IDS).logits, runtime(IDS).logits
        assert (y - y_rt).abs().max() <= TOL * y_rt.abs().max()
    else:
        assert_layers_match_with_ct_quantizer(model, runtime)


@pytest.mark.parametrize("g", [32, 128])
def test_zero_point_layout_exports_as_w4a16_asym(tmp_path, tiny_llama, g):
    """w4a16-gptq with --param symmetric=false stores w4a16-zp (a zero point per group); the export
    is compressed-tensors' asymmetric W4A16: the zero points packed along N as compressed-tensors
    packs them, and its decoding, (q - z) · s, gives exactly the runtime's weights.  The tiny model's
    K (64, 160) with g = 128 are written as groups of 32, scales and zero points repeated."""
    out, dest = tmp_path / "out", tmp_path / "ct"
    run("quantize", tiny_llama, "--scheme", "w4a16-gptq", "--param", "symmetric=false", "--base", "rtn", "-g", g,
        "-o", out, "-q")
    report = json.loads((out / "qconvert.json").read_text())
    assert {r["layout"] for r in report["layers"]} == {"w4a16-zp"}
    assert "OK" in run("verify", out, "--no-compare").output
    res = run("export", out, "-o", dest)
    assert "compressed-tensors W4A16_ASYM, group size 32" in res.output
    group = json.loads((dest / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["symmetric"] is False and group["input_activations"] is None
    native, ct, runtime = ShardedReader(out), ShardedReader(dest), load(out)
    spread = set()
    for n, layer in quantized_linears(runtime).items():
        zeros = native.get(f"{n}.zeros").repeat_interleave(g // 32, dim=1)[:, : -(-layer.in_features // 32)]
        spread |= set(zeros.unique().tolist())
        packed = ct.get(f"{n}.weight_zero_point")
        assert packed.dtype == torch.int32 and packed.shape == (-(-layer.out_features // 8), zeros.shape[1])
        assert torch.equal(ct_pack.unpack_from_int32(packed, 4, zeros.shape, packed_dim=0), zeros)
        q = ct_pack.unpack_from_int32(ct.get(f"{n}.weight_packed"), 4, (layer.out_features, layer.in_features))
        s = ct.get(f"{n}.weight_scale").double().repeat_interleave(32, dim=1)
        z = zeros.double().repeat_interleave(32, dim=1)
        assert torch.equal((q.double() - z) * s, layer._dequantized(torch.float64)), n
    assert len(spread) > 4  # zero points that differ: a wrong order of them would show


def test_smollm2_shapes_preset_groups_are_split_exactly(tmp_path):
    """SmolLM2's K (576, 1536) are not multiples of the preset's g = 128: the export writes groups
    of gcd(128, 576, 1536) = 64, each of OUT's scales twice, and transformers decodes exactly
    OUT's weights; -g 64 exports as it is."""
    src = write_model(tmp_path / "src", tiny_config(hidden=576, intermediate=1536, layers=1, heads=9, kv_heads=3))
    out, dest = tmp_path / "out", tmp_path / "ct"
    run("quantize", src, "--scheme", "is-w4a8-rtn", "-o", out, "-q")  # the preset's g = 128
    res = run("export", out, "-o", dest)
    assert "group size 64, each group of 128 written as 2 of 64 with its scale" in " ".join(res.output.split())
    marker = json.loads((dest / "qconvert_export.json").read_text())
    assert (marker["group_size"], marker["split_from_group_size"]) == (64, 128)
    group = json.loads((dest / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["group_size"] == 64
    name = "model.layers.0.mlp.down_proj"
    ct = ShardedReader(dest)
    scale = ct.get(f"{name}.weight_scale")
    assert scale.shape == (576, 1536 // 64)
    assert torch.equal(scale[:, 0::2], scale[:, 1::2])  # 1536 = 12 x 128: no group was padded here
    q_proj = ct.get("model.layers.0.self_attn.q_proj.weight_scale")  # K = 576 = 4.5 x 128: the padded
    assert q_proj.shape == (576, 9) and torch.equal(q_proj[:, 0:8:2], q_proj[:, 1:8:2])  # group's scale once
    model, runtime = load_exported(dest), load(out)
    model(IDS)  # decompress
    for n, layer in quantized_linears(runtime).items():
        exact = decoded_weight(layer)
        w = model.get_submodule(n).weight.double()
        assert ((w - exact).abs() <= exact.abs() * 2.0**-22).all(), n
    assert_layers_match_with_ct_quantizer(model, runtime)
    shutil.rmtree(out)
    shutil.rmtree(dest)
    run("quantize", src, "--scheme", "is-w4a8-rtn", "-g", 64, "-o", out, "-q")
    report = json.loads((out / "qconvert.json").read_text())
    assert {r["group_size"] for r in report["layers"]} == {64}
    assert {r["shape"][1] for r in report["layers"]} == {576, 1536}
    res = run("export", out, "-o", dest)
    assert "written as" not in res.output and "split_from_group_size" not in (dest / "qconvert_export.json").read_text()
    assert ShardedReader(dest).get("model.layers.0.mlp.down_proj.weight_scale").shape == (576, 1536 // 64)
    model, runtime = load_exported(dest), load(out)
    assert_layers_match_with_ct_quantizer(model, runtime)


def test_groups_sized_for_tensor_parallel_ranks(tmp_path):
    """At TP 2 vLLM gives each rank half of down_proj's K (640 -> 320), which g = 128 does not
    divide: `--target vllm --tensor-parallel 2` writes groups of 64; without it, OUT's 128."""
    src = write_model(tmp_path / "src", tiny_config(hidden=256, intermediate=640, layers=1, heads=4, kv_heads=2))
    out = tmp_path / "out"
    run("quantize", src, "--scheme", "w4a16-gptq", "--base", "rtn", "--rotate", "none", "-o", out, "-q")
    res = run("export", out, "-o", tmp_path / "tp1")
    assert "group size 128, 7 quantized" in res.output and "written as" not in res.output
    run("verify", out, "--no-compare", "--target", "vllm:sm90", "--tensor-parallel", "2")  # exit 0: it would serve
    res = run("export", out, "-o", tmp_path / "tp2", "--target", "vllm:sm90", "--tensor-parallel", "2")
    assert "group size 64, each group of 128 written as 2 of 64" in " ".join(res.output.split())
    name = "model.layers.0.mlp.down_proj"
    one, two = ShardedReader(tmp_path / "tp1"), ShardedReader(tmp_path / "tp2")
    assert torch.equal(two.get(f"{name}.weight_scale"), one.get(f"{name}.weight_scale").repeat_interleave(2, dim=1))
    assert torch.equal(two.get(f"{name}.weight_packed"), one.get(f"{name}.weight_packed"))
    y, y_rt = load_exported(tmp_path / "tp2")(IDS).logits, load(out)(IDS).logits
    assert (y - y_rt).abs().max() <= TOL * y_rt.abs().max()


def test_eval_and_generate_run_the_export_in_transformers(tmp_path, tiny_llama):
    """`qconvert eval` / `generate` on an export load it as its users do (transformers with
    compressed-tensors): W4A16 has no activation quantization, so it scores what qconvert's
    runtime scores on OUT, to float32 rounding; the result is kept for the export's card."""
    from qconvert.hub import export_card

    out, dest, text = tmp_path / "out", tmp_path / "ct", tmp_path / "text.raw"
    text.write_text(TEXT)
    run("quantize", tiny_llama, "--scheme", "w4a16-gptq", "--base", "rtn", "-o", out, "-q")  # g = 128: split to 32
    ev = ("eval", "--data-file", text, "--seqlen", 32, "--max-windows", 3, "--json", "-q", "--device", "cpu")
    q = json.loads(run(ev[0], out, *ev[1:]).stdout)
    run("export", out, "-o", dest)
    c = json.loads(run(ev[0], dest, *ev[1:]).stdout)
    assert c["kind"] == "compressed-tensors" and q["kind"] == "qconvert"
    assert (c["windows"], c["tokens"]) == (q["windows"], q["tokens"]) == (3, q["tokens"])
    assert abs(c["perplexity"] - q["perplexity"]) <= 1e-5 * q["perplexity"], (c, q)
    assert json.loads((dest / "eval.json").read_text()) == [{**c, "target": "ct"}]
    card = export_card(dest)
    assert "this export as transformers runs it" in card and "the qconvert OUT this was exported from" in card
    assert f"| text.raw | 32 | 3 | {c['perplexity']:.3f} |" in card
    res = run("generate", dest, "--prompt", "hello world", "--max-new-tokens", 3, "--device", "cpu")
    assert "[compressed-tensors on cpu] prefill" in res.output


def test_export_without_compressed_tensors_says_what_to_install(tmp_path, is_ct, monkeypatch):
    import sys

    text = tmp_path / "text.raw"
    text.write_text(TEXT)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails as if not installed
    res = run("eval", is_ct, "--data-file", text, "--seqlen", 32, "--max-windows", 1, ok=False)
    assert res.exit_code == 1 and 'pip install "qconvert[export]"' in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------- refusals


def test_refuses_k_no_group_of_32_divides(tmp_path):
    """K = 80 and 200 with g = 128: the groups could only be split into 8s, which no vLLM int4
    kernel takes: refused before anything is written, naming the layer, K, g and what to use."""
    src = write_model(tmp_path / "src", tiny_config(hidden=80, intermediate=200, layers=1, heads=5, kv_heads=1))
    out, dest = tmp_path / "g128", tmp_path / "ct"
    run("quantize", src, "--scheme", "is-w4a8-rtn", "-o", out, "-q")
    res = run("export", out, "-o", dest, ok=False)
    assert res.exit_code == 1
    msg = " ".join(res.output.split())
    assert "layer model.layers.0.mlp.down_proj has K = 200 input features" in msg and "g = 128" in msg
    assert "no group of 32 or more (the smallest vLLM's int4 kernels take) divides every K" in msg
    assert "(gcd(g, every K) = 8)" in msg
    assert "qconvert quantize SOURCE --scheme is-w4a8-rtn --group-size 8 -o OUT` (transformers takes it; vLLM " \
           "does not serve groups below 32)" in msg  # 8 divides 80 and 200
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g128", "src"]  # nothing written


def test_tiny_model_preset_groups_split_to_32(tmp_path, tiny_llama):
    """K = 64 and 160 with the preset's g = 128: groups of 32, the tiny model's largest."""
    out, dest = tmp_path / "g128", tmp_path / "ct"
    run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-o", out, "-q")
    res = run("export", out, "-o", dest)
    assert "group size 32, each group of 128 written as 4 of 32" in " ".join(res.output.split())
    assert_layers_match_with_ct_quantizer(load_exported(dest), load(out))


def test_refuses_layouts_it_cannot_express(tmp_path, is_out, tiny_llama):
    out = tmp_path / "fp4"  # FP4 with power-of-two group factors: no compressed-tensors scheme holds it
    run("quantize", tiny_llama, "--scheme", "zqfp-w4a8", "--base", "rtn", "-g", 32, "-o", out, "-q")
    res = run("export", out, "-o", tmp_path / "ct", ok=False)
    msg = " ".join(res.output.split())
    assert res.exit_code == 1 and "layout fp4-fp8" in msg and "no compressed-tensors equivalent" in msg
    assert "w4a8-is as W4A8 (pack-quantized)" in msg and "w4a16 as W4A16 (pack-quantized)" in msg
    assert "w4a16-zp as W4A16_ASYM (pack-quantized)" in msg
    assert not (tmp_path / "ct").exists()
    other = tmp_path / "other"
    shutil.copytree(is_out, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"] = "w8a8-fp8"  # a layout this release lacks
    (other / "config.json").write_text(json.dumps(cfg))
    res = run("export", other, "-o", tmp_path / "ct", ok=False)
    msg = " ".join(res.output.split())
    assert res.exit_code == 1 and "'w8a8-fp8' is unknown to this qconvert" in msg and "install the plugin" in msg
    assert not (tmp_path / "ct").exists()


def test_refuses_a_source_that_is_not_an_out(tmp_path, tiny_llama):
    res = run("export", tiny_llama, "-o", tmp_path / "ct", ok=False)
    assert res.exit_code == 1 and "is not a qconvert output" in res.output


MOE_KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]
MOE_ROUTERS = {"mixtral": "block_sparse_moe.gate", "qwen2_moe": "mlp.gate", "qwen3_moe": "mlp.gate"}


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_mixture_of_experts_exports_per_expert(kind, tmp_path):
    """An MoE OUT exports one compressed linear per expert projection under the checkpoint's names,
    the routers in ``ignore`` (vLLM builds them as linears; tests/test_vllm.py serves these), and
    transformers with compressed-tensors loads it into its fused experts (every tensor used) and
    computes the runtime's logits exactly."""
    from transformers import AutoModelForCausalLM

    from helpers import save_pretrained_model, tiny_moe_config

    src = save_pretrained_model(tmp_path / "src", tiny_moe_config(kind, init_std=0.1), tokenizer=True)
    run("quantize", src, "--scheme", "w4a16-gptq", "--base", "rtn", "-g", 32, "-o", tmp_path / "out", "-q")
    run("export", tmp_path / "out", "-o", tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    router = f"model.layers.0.{MOE_ROUTERS[kind]}"
    assert router in cfg["quantization_config"]["ignore"] and "lm_head" in cfg["quantization_config"]["ignore"]
    names = set(ShardedReader(tmp_path / "ct").keys())
    block = router.rpartition(".")[0]
    assert {f"{block}.experts.{e}.{lin}.weight_packed" for e in range(4)
            for lin in (("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj"))} <= names
    assert f"{router}.weight" in names  # the router as the source has it
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = model.eval()(ids).logits, load(tmp_path / "out")(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_an_moe_block_with_some_experts_excluded_is_refused(tmp_path):
    from helpers import save_pretrained_model, tiny_moe_config

    src = save_pretrained_model(tmp_path / "src", tiny_moe_config("qwen3_moe"), tokenizer=True)
    run("quantize", src, "--scheme", "w4a16-gptq", "--base", "rtn", "-g", 32, "-o", tmp_path / "out", "-q",
        "--exclude", "*.experts.0.*")
    res = run("export", tmp_path / "out", "-o", tmp_path / "ct", ok=False)
    msg = " ".join(res.output.split())
    assert res.exit_code == 1 and "model.layers.0.mlp: 3 of its 12 expert linears" in msg and "one scheme" in msg, msg
    assert not (tmp_path / "ct").exists()


def test_existing_output_needs_force(tmp_path, is_out, is_ct):
    dest = tmp_path / "ct"
    shutil.copytree(is_ct, dest)
    (dest / "stale.txt").write_text("from an earlier export")
    res = run("export", is_out, "-o", dest, ok=False)
    assert res.exit_code == 1 and "already exists; pass --force" in res.output
    assert (dest / "stale.txt").exists()
    run("export", is_out, "-o", dest, "--force")  # an earlier export: replaced whole
    assert not (dest / "stale.txt").exists() and (dest / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = run("export", is_out, "-o", mine, "--force", ok=False)
    assert "is not a qconvert export" in res.output and (mine / "notes.txt").read_text() == "keep"
    res = run("export", is_out, "-o", is_out / "inside", ok=False)
    assert "inside it" in res.output


def test_scale_dtype_float16(tmp_path, is_out):
    dest = tmp_path / "ct16"
    res = run("export", is_out, "-o", dest, "--scale-dtype", "float16")
    assert "weight_scale in float16" in res.output
    scale = ShardedReader(dest).get("model.layers.0.self_attn.q_proj.weight_scale")
    assert scale.dtype == torch.float16
    marker = json.loads((dest / "qconvert_export.json").read_text())
    assert 0 < marker["max_scale_rel_error"] <= 2.0**-11  # one fp16 rounding


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path, smollm2, wiki_test):
    from qconvert.calibration_text import load_eval_text

    out, dest = tmp_path / "out", tmp_path / "ct"
    run("quantize", "smollm2-135m", "--scheme", "is-w4a8-rtn", "-g", 64, "-o", out, "-q")
    res = run("export", out, "-o", dest)
    assert "weight_scale in float16" in res.output  # the OUT's dtype (docs/export.md)
    run("export", out, "-o", dest, "--force", "--scale-dtype", "float32")  # the comparison below is of the math
    tok = smollm2.load_tokenizer()
    ids = tok(load_eval_text("wikitext2", wiki_test)[:4000], return_tensors="pt").input_ids[:, :256]
    # float32 both: the GGUF's OUT and its export say float16 (docs/format.md), and this compares the math
    model, runtime = load_exported(dest, torch.float32), load(out, dtype=torch.float32)
    assert json.loads((dest / "config.json").read_text())["dtype"] == "float16"
    layers = quantized_linears(runtime)
    ends = [n for n in layers if n.startswith(("model.layers.0.", "model.layers.29."))]
    y, seen = capture_linear_io(model, ids, ends)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref, "quantize_per_token_int8", ct_quantize_per_token)
        for n, (x, out_y) in seen.items():
            assert (layers[n](x) - out_y).abs().max() <= TOL * out_y.abs().max(), n
    # Across 30 blocks, int8 rounding differences compound: measured here, the exported model
    # and the runtime agree on 84% of next tokens (the runtime fed compressed-tensors' own
    # quantizer: 86%; either against the unquantized model: 62-66%), and their mean NLL on
    # these 256 tokens differs by 0.3%.
    y_rt = runtime(ids).logits
    top1 = (y.argmax(-1) == y_rt.argmax(-1)).float().mean().item()
    nll = torch.nn.functional.cross_entropy(y[0, :-1], ids[0, 1:]).item()
    nll_rt = torch.nn.functional.cross_entropy(y_rt[0, :-1], ids[0, 1:]).item()
    assert top1 >= 0.75, top1
    assert abs(nll - nll_rt) <= 0.02 * nll_rt, (nll, nll_rt)
