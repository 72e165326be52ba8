"""benchmarks/decode_variants.py (gpu_check.sh part b: what the one-wave plan and the own amax each
buy) checked without a GPU: its four plans are the old and new rules (the 'before' plan is the one
the H200 measured: 288 CTAs for q/o at M = 1, 448 for gate_up, the amax exchanged), and each of them
runs on the lane-exact emulator to the current plan's output, bit for bit."""

from __future__ import annotations

import importlib.util
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
def test_every_variant_runs_to_the_same_output(m, monkeypatch):
    n, k, g = 384, 1024, 128   # 3 tiles on 4 SMs: 2 x 4 / 3 rounds to 3 splits up, 2 down
    prep = cuda.prepare("w4a8-is", make_layer(n, k, g, "w4a8-is", 3), g, "cpu")
    x = activations(m, k, torch.float16, 5)
    with emulate.emulating(sm_count=4):
        want = cuda.linear(x, prep)
    plans = set()
    for v in dv.VARIANTS:
        monkeypatch.setattr(cuda, "plan", lambda mm, p, s, v=v: dv.variant_plan(v, mm, p, s))
        with emulate.emulating(sm_count=4) as emu:
            y = cuda.linear(x, prep)
        assert torch.equal(y, want), v
        _, grid, _, args = emu.launches[-1]
        plans.add((grid[0], args["A"]))
    assert len(plans) == 4  # four distinct launches: 2 split counts x 2 amax paths


def test_without_a_gpu_it_says_so(tmp_path):
    from helpers import run_benchmark_without_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    p = run_benchmark_without_gpu(ROOT / "benchmarks" / "decode_variants.py", "--json", str(tmp_path / "d.json"))
    assert p.returncode != 0 and "no CUDA device" in p.stderr and not (tmp_path / "d.json").exists()
