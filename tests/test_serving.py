"""Will it serve? ``export --target vllm:...`` and ``verify --target`` apply vLLM's rules per layer
(qconvert/serving.py) before anything is written."""

import json
from types import SimpleNamespace

import pytest

from helpers import run_cli
from qconvert.errors import QConvertError
from qconvert.serving import check_layer, check_model, parse_target, working_tp

W4A16 = {"preset": "W4A16", "weights": {"group_size": 128}}
W4A8 = {"preset": "W4A8", "weights": {"group_size": 128}}
W8A8 = {"preset": "W8A8", "weights": {}}
FP8 = {"preset": "FP8_DYNAMIC", "weights": {}}


def test_kernel_choice_per_device():
    assert check_layer("m.q_proj", 4096, 4096, W4A16, "sm90", 1).kernel == "MacheteLinearKernel"
    assert check_layer("m.q_proj", 4096, 4096, W4A16, "sm80", 1).kernel == "MarlinLinearKernel"
    assert check_layer("m.k_proj", 960, 576, {"preset": "W4A16", "weights": {"group_size": 64}}, "sm90", 1).kernel \
        == "MarlinLinearKernel"  # N = 960 is no multiple of 128: Machete cannot, Marlin can
    cpu = check_layer("m.q_proj", 4096, 4096, W4A16, "cpu", 1)
    assert cpu.level == "warn" and "AVX-512" in cpu.note
    w4a8 = check_layer("m.q_proj", 4096, 4096, W4A8, "sm90", 1)
    assert w4a8.level == "warn" and "as W4A16" in w4a8.note and w4a8.scheme == "CompressedTensorsWNA8Int"
    assert check_layer("m.q_proj", 4096, 4096, W8A8, "sm90", 1).kernel == "CutlassInt8ScaledMM"
    assert check_layer("m.q_proj", 4104, 4096, W8A8, "sm90", 1).level == "warn"  # N % 16: Triton
    assert "VNNI" in check_layer("m.q_proj", 64, 64, W8A8, "cpu", 1).note
    assert check_layer("m.q_proj", 64, 64, FP8, "sm80", 1).scheme == "CompressedTensorsW8A16Fp8"
    assert check_layer("m.q_proj", 64, 64, FP8, "sm89", 1).level == "ok"


def test_experts_are_served_by_the_moe_method():
    """An expert's linear goes to vLLM's fused MoE layer: its W4A16 MoE method (on CPUs the int8-
    activation CPUExpertsInt4), the dense kernels' rules aside; the group must still divide a rank's
    K (an expert's down projection splits K as down_proj does); other schemes are not checked."""
    name = "model.layers.0.mlp.experts.3.down_proj"
    gpu, cpu = (check_layer(name, 2048, 768, W4A16, device, 1) for device in ("sm90", "cpu"))
    assert (gpu.scheme, gpu.level) == ("CompressedTensorsWNA16MoEMethod", "ok")
    assert (cpu.kernel, cpu.level) == ("CPUExpertsInt4", "warn") and "int8" in cpu.note
    assert check_layer("model.layers.0.block_sparse_moe.experts.0.w1", 768, 2048, W4A16, "sm90", 1).scheme \
        == "CompressedTensorsWNA16MoEMethod"
    split = check_layer(name, 2048, 640, W4A16, "sm90", 2)  # K = 320 per rank: 128 does not divide it
    assert split.level == "error" and "320" in split.note
    assert check_layer(name, 2048, 768, W8A8, "sm90", 1).level == "warn"


def test_tensor_parallel_splits_k_of_row_parallel_layers():
    g64 = {"preset": "W4A16", "weights": {"group_size": 64}}
    # SmolLM2 at TP 3: o_proj K = 576 / 3 = 192 (a multiple of 64, not of 128), down_proj K = 512
    assert check_layer("model.layers.0.self_attn.o_proj", 576, 576, g64, "sm90", 3).level == "ok"
    bad = check_layer("model.layers.0.self_attn.o_proj", 576, 576, W4A16, "sm90", 3)
    assert bad.level == "error" and "does not divide K per rank (192 = 576 / 3)" in bad.note
    assert check_layer("model.layers.0.self_attn.q_proj", 576, 576, W4A16, "sm90", 5).level == "error"  # N % 5


def test_heads_and_working_sizes():
    cfg = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3)
    layers = [SimpleNamespace(name="model.layers.0.self_attn.o_proj", n=576, k=576)]
    g64 = {"preset": "W4A16", "weights": {"group_size": 64}}
    assert check_model(layers, g64, cfg, "sm90", 2)[0].level == "error"  # 9 heads on 2 ranks
    assert working_tp(layers, g64, cfg, "sm90", limit=9) == [1, 3, 9]
    assert parse_target("vllm") == "sm90" and parse_target("vllm:cpu") == "cpu"
    with pytest.raises(QConvertError, match="choose vllm"):
        parse_target("sglang")


@pytest.fixture(scope="module")
def g32_out(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "out"
    run_cli("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-g", "32", "-o", out, "-q")
    return out


def test_export_refuses_a_tp_size_that_breaks_the_group(g32_out, tmp_path):
    """Tiny Llama: down_proj K = 160 -> 80 per rank at TP 2, not a multiple of g = 32."""
    res = run_cli("export", g32_out, "-o", tmp_path / "ct", "--target", "vllm:sm90", "--tensor-parallel", "2", ok=False)
    msg = " ".join(res.output.split())
    assert res.exit_code == 1 and "would refuse layer model.layers.0.mlp.down_proj" in msg
    assert "group size 32 does not divide K per rank (80 = 160 / 2)" in msg and "sizes that work: 1" in msg
    assert not (tmp_path / "ct").exists() and "Traceback" not in res.output
    ok = run_cli("export", g32_out, "-o", tmp_path / "ct", "--target", "vllm:sm90")
    assert "CompressedTensorsWNA8Int" in ok.output and "as W4A16" in " ".join(ok.output.split())
    marker = json.loads((tmp_path / "ct" / "qconvert_export.json").read_text())
    assert len(marker["serving"]) == 14 and {f["level"] for f in marker["serving"]} == {"warn"}


def test_verify_target(g32_out):
    res = run_cli("verify", g32_out, "--no-compare", "--target", "vllm:sm90", "--tensor-parallel", "2", ok=False)
    assert res.exit_code == 1 and "would refuse layer" in res.output
    good = json.loads(run_cli("verify", g32_out, "--no-compare", "--target", "vllm:sm80", "--json").stdout)
    assert good["ok"] and len(good["serving"]) == 14


def test_working_sizes_are_those_an_export_could_write(tmp_path):
    """g = 128, o_proj K = 384, down_proj K = 1024: at TP 8 a rank's o_proj K is 48, so groups would
    have to be 16 (no vLLM int4 kernel takes them) and TP 8 is refused; TP 2 and 4 work because
    their exports write groups of 64 and 32, which the sizes named as working must reflect."""
    from helpers import tiny_config, write_model

    src = write_model(tmp_path / "src", tiny_config(hidden=384, intermediate=1024, layers=1, heads=8, kv_heads=2))
    out = tmp_path / "out"
    run_cli("quantize", src, "--scheme", "w4a16-gptq", "--base", "rtn", "--rotate", "none", "-o", out, "-q")
    res = run_cli("export", out, "-o", tmp_path / "ct", "--target", "vllm:sm90", "--tensor-parallel", "8", ok=False)
    msg = " ".join(res.output.split())
    assert res.exit_code == 1 and "would refuse layer model.layers.0.self_attn.o_proj" in msg
    assert "group size 128 does not divide K per rank (48 = 384 / 8)" in msg
    assert "tensor-parallel sizes that work: 1, 2, 4" in msg and not (tmp_path / "ct").exists()
    for tp, g in ((2, 64), (4, 32)):
        ok = run_cli("export", out, "-o", tmp_path / f"tp{tp}", "--target", "vllm:sm90", "--tensor-parallel", tp)
        assert f"group size {g}, each group of 128" in " ".join(ok.output.split())
