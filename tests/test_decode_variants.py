"""benchmarks/decode_variants.py (gpu_check.sh part b: what the one-wave plan, the own amax and the
scale prefetch each buy) checked without a GPU: its four plans are the old and new rules (the
'before' plan is the one the H200 measured: 288 CTAs for q/o at M = 1, 448 for gate_up, the amax
exchanged), each of them runs on the lane-exact emulator to the current plan's output, bit for bit,
and the no-prefetch variant's source builds into decode kernels without the prefetch."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from qconvert_kernels.w4a8 import cuda, emulate
from test_kernels_w4a8_emulate import LLAMA3_8B, _Meta, activations, make_layer

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("decode_variants", ROOT / "benchmarks" / "decode_variants.py")
dv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dv)


def test_the_before_plan_is_the_measured_one():
    qo, gu = _Meta(*LLAMA3_8B["q_proj"]), _Meta(*LLAMA3_8B["gate_up_proj"])
    before = dv.variant_plan("before", 1, qo, 132)
    assert before.grid[0] * before.grid[1] == 288 and before.amax_ctas > 0
    assert dv.variant_plan("before", 1, gu, 132).grid == (2, 224)
    now = dv.variant_plan("now", 1, qo, 132)
    assert now == cuda.plan(1, qo, 132) and now.grid[0] * now.grid[1] == 256 and now.amax_ctas == 0
    one_wave, own = dv.variant_plan("one-wave", 1, qo, 132), dv.variant_plan("own-amax", 1, qo, 132)
    assert one_wave.splits == now.splits and one_wave.amax_ctas > 0
    assert own.splits == before.splits and own.amax_ctas == 0


@pytest.mark.parametrize("m", [1, 4])
def test_every_variant_runs_to_the_same_output(m, monkeypatch, tmp_path):
    """Each variant as the script launches it (its plan; the no-prefetch variant's own build of the
    source, whose W4R_SCALE_AHEAD the emulator takes from the launched file) gives the current
    output, bit for bit; the no-prefetch launch issues no prefetch, today's does."""
    n, k, g = 384, 1024, 128   # 3 tiles on 4 SMs: 2 x 4 / 3 rounds to 3 splits up, 2 down
    prep = cuda.prepare("w4a8-is", make_layer(n, k, g, "w4a8-is", 3), g, "cpu")
    x = activations(m, k, torch.float16, 5)
    with emulate.emulating(sm_count=4):
        want = cuda.linear(x, prep)
    plans, prefetches, real = set(), {}, cuda.SOURCE_R
    for v in dv.VARIANTS:
        monkeypatch.setattr(cuda, "plan", lambda mm, p, s, v=v: dv.variant_plan(v, mm, p, s))
        monkeypatch.setattr(cuda, "SOURCE_R", dv.variant_source(v, tmp_path) if v in dv.KERNEL_DEFINES else real)
        with emulate.emulating(sm_count=4) as emu:
            y = cuda.linear(x, prep)
        assert torch.equal(y, want), v
        _, grid, _, args = emu.launches[-1]
        plans.add((grid[0], args["A"]))
        prefetches[v] = emu.prefetches[-1]
    assert len(plans) == 4  # four distinct launches: 2 split counts x 2 amax paths (no-prefetch: now's plan)
    assert prefetches["no-prefetch"] == 0 and prefetches["now"] > 0, prefetches


def test_without_a_gpu_it_says_so(tmp_path):
    from helpers import run_benchmark_without_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    p = run_benchmark_without_gpu(ROOT / "benchmarks" / "decode_variants.py", "--json", str(tmp_path / "d.json"))
    assert p.returncode != 0 and "no CUDA device" in p.stderr and not (tmp_path / "d.json").exists()


def test_the_no_prefetch_variant_builds_without_the_prefetch(tmp_path):
    """The variant's file defines W4R_SCALE_AHEAD 0 and includes the real source: its decode kernels
    have no CCTL.E.PF2 (the default build's have them: tests/test_kernels_families.py), the same
    entry points, and nothing else changes name."""
    from qconvert_kernels import compile as kc
    from qconvert_kernels import launch

    if not kc.nvrtc_available():
        pytest.skip("libnvrtc not found")
    src = dv.variant_source("no-prefetch", tmp_path)
    assert src.name == cuda.SOURCE_R.name and src.read_text().index("#define W4R_SCALE_AHEAD 0") < src.read_text().index(
        "#define W4R_SCALE_AHEAD 4") and not re.search(r"^\s*#\s*include", src.read_text(), re.M)
    path = launch.build(src, "sm_90")
    report = kc.parse_ptxas(launch.build_log(path))
    assert set(report) == set(kc.parse_ptxas(launch.build_log(launch.build(cuda.SOURCE_R, "sm_90"))))
    if kc.cuobjdump_path() is None:
        pytest.skip("cuobjdump/nvdisasm not found")
    sass = kc.kernel_sass(kc.sass(path))
    decode = [k for k in sass if k.startswith("w4a8r_decode_")]
    assert len(decode) == 12 and all(kc.opcodes(sass[k]).get("CCTL.E.PF2", 0) == 0 for k in decode)


def test_unknown_variant_is_refused(tmp_path):
    from helpers import run_benchmark_without_gpu

    p = run_benchmark_without_gpu(ROOT / "benchmarks" / "decode_variants.py", "--json", str(tmp_path / "d.json"), "--variants", "now,fast")
    assert p.returncode != 0 and "--variants: unknown fast" in p.stderr and not (tmp_path / "d.json").exists()
