"""benchmarks/decode_variants.py (gpu_check.sh part b: what the one-wave plan, the own amax, the
scale prefetch and a deeper weight pipeline each buy) checked without a GPU: its four plans are the
old and new rules (the 'before' plan is the one the H200 measured: 288 CTAs for q/o at M = 1, 448
for gate_up, the amax exchanged), every variant runs on the lane-exact emulator to the current
output, bit for bit, and the build variants' sources build as described."""

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
def test_every_variant_runs_to_the_same_output(m, tmp_path):
    """Each variant as the script launches it (``dv.variant``: its plan, its own build of the source,
    whose W4R_ macros the emulator takes from the launched file, and its shared memory) gives the
    current output, bit for bit: the no-prefetch launch issues no prefetch, the others do, and the
    16-stage launch takes 32 KB more shared memory and streams 15 blocks ahead on the emulator."""
    n, k, g = 384, 1024, 128   # 3 tiles on 4 SMs: 2 x 4 / 3 rounds to 3 splits up, 2 down
    prep = cuda.prepare("w4a8-is", make_layer(n, k, g, "w4a8-is", 3), g, "cpu")
    x = activations(m, k, torch.float16, 5)
    with emulate.emulating(sm_count=4):
        want = cuda.linear(x, prep)
    sources = {v: dv.variant_source(v, tmp_path) for v in dv.KERNEL_DEFINES}
    plans, prefetches, smem = set(), {}, {}
    for v in dv.VARIANTS:
        with dv.variant(v, sources), emulate.emulating(sm_count=4) as emu:
            y = cuda.linear(x, prep)
        assert torch.equal(y, want), v
        _, grid, smem[v], args = emu.launches[-1]
        plans.add((grid[0], args["A"]))
        prefetches[v] = emu.prefetches[-1]
    assert cuda.plan is dv._PLAN and cuda.SOURCE_R.parent == Path(dv._cuda.__file__).parent and cuda.D_W_BYTES == 8 * 8 * 512
    assert len(plans) == 4  # four distinct launches: 2 split counts x 2 amax paths (the build variants: now's plan)
    assert prefetches["no-prefetch"] == 0 and prefetches["now"] > 0 and prefetches["stages-16"] == prefetches["now"], prefetches
    assert smem["stages-16"] == smem["now"] + 8 * 8 * 512 == emulate.decode_smem(1, 16), smem


def test_without_a_gpu_it_says_so(tmp_path):
    from helpers import run_benchmark_without_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    p = run_benchmark_without_gpu(ROOT / "benchmarks" / "decode_variants.py", "--json", str(tmp_path / "d.json"))
    assert p.returncode != 0 and "no CUDA device" in p.stderr and not (tmp_path / "d.json").exists()


def test_the_build_variants_build(tmp_path):
    """Each variant's file defines its macros before the real source's text (includes inlined): the
    no-prefetch build's decode kernels have no CCTL.E.PF2 (the default build's have two each:
    tests/test_kernels_families.py), the 16-stage build keeps them, and both have the same entry
    points as the launchers' build, no local memory and at most 128 registers."""
    from qconvert_kernels import compile as kc
    from qconvert_kernels import launch

    if not kc.nvrtc_available():
        pytest.skip("libnvrtc not found")
    want = set(kc.parse_ptxas(launch.build_log(launch.build(cuda.SOURCE_R, "sm_90"))))
    for v, prefetches in (("no-prefetch", 0), ("stages-16", 2)):
        src = dv.variant_source(v, tmp_path)
        text = src.read_text()
        (macro, value), = dv.KERNEL_DEFINES[v].items()
        assert src.name == cuda.SOURCE_R.name and text.index(f"#define {macro} {value}") < text.index(f"#ifndef {macro}")
        assert not re.search(r"^\s*#\s*include", text, re.M)
        path = launch.build(src, "sm_90")
        report = kc.parse_ptxas(launch.build_log(path))
        assert set(report) == want
        decode = [k for k in report if k.startswith("w4a8r_decode_")]
        assert len(decode) == 12 and all(report[k]["stack"] == 0 and report[k]["registers"] <= 128 for k in decode), v
        if kc.cuobjdump_path() is not None:
            sass = kc.kernel_sass(kc.sass(path))
            assert all(kc.opcodes(sass[k]).get("CCTL.E.PF2", 0) == prefetches for k in decode), v


def test_unknown_variant_is_refused(tmp_path):
    from helpers import run_benchmark_without_gpu

    p = run_benchmark_without_gpu(ROOT / "benchmarks" / "decode_variants.py", "--json", str(tmp_path / "d.json"), "--variants", "now,fast")
    assert p.returncode != 0 and "--variants: unknown fast" in p.stderr and not (tmp_path / "d.json").exists()


def test_the_deep_pipeline_wraps_its_ring_exactly(tmp_path):
    """The 16-stage build on the emulator where a CTA streams 64 k64 blocks (the ring of 16 slots goes
    round four times): the reference's bits at M = 1 and 5, and a slot read one stage on is caught."""
    from test_kernels_w4a8_emulate import check_case

    sources = {"stages-16": dv.variant_source("stages-16", tmp_path)}
    with dv.variant("stages-16", sources):
        for m in (1, 5):
            pl, emu = check_case(m, 136, 4096, 128, "w4a8-is", sm_count=1)
            assert pl.kind == "decode" and pl.splits == 1 and emu.launches[-1][2] == emulate.decode_smem(1, 16)
        with pytest.raises(emulate.EmulationError):
            check_case(5, 136, 4096, 128, "w4a8-is", sm_count=1, mutations=frozenset({"stage_off_by_one"}))
