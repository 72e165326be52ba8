"""benchmarks/profile_w4a8.py (Nsight Compute on the W4A8 kernels, gpu_check.sh part g) checked
without a GPU: the ncu command it builds, and a clear refusal where no CUDA device is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("profile_w4a8", ROOT / "benchmarks" / "profile_w4a8.py")
profile_w4a8 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_w4a8)


def test_ncu_command(tmp_path):
    cmd = profile_w4a8.ncu_command("/x/ncu", tmp_path / "p.csv", 3)
    assert cmd[:3] == ["/x/ncu", "--clock-control", "none"]  # the device's clocks left alone
    assert cmd[cmd.index("--kernel-name") + 1] == "regex:w4a8r_(prefill|decode)_"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--section"] == list(profile_w4a8.SECTIONS)
    assert cmd[-5:] == [sys.executable, str(ROOT / "benchmarks" / "profile_w4a8.py"), "--run", "--case", "3"]
    # the cases: prefill at 4096 and 256, decode at 1, both layouts; the plan picks those kernels
    from qconvert_kernels.w4a8 import cuda

    sys.path.insert(0, str(ROOT / "tests"))
    from test_kernels_w4a8_emulate import make_layer

    kinds = set()
    for m, layout in profile_w4a8.CASES:
        prep = cuda.prepare(layout, make_layer(profile_w4a8.N, profile_w4a8.K, profile_w4a8.G, layout, 7), profile_w4a8.G, "cpu")
        kinds.add((cuda.plan(m, prep, 132).kind, layout))
    assert kinds == {(k, l) for k in ("prefill", "decode") for l in ("w4a8-is", "w4a8-fs")}


def test_without_a_gpu_it_says_so(tmp_path):
    import torch

    from helpers import run_benchmark_without_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    p = run_benchmark_without_gpu(ROOT / "benchmarks" / "profile_w4a8.py", "--ncu-csv", str(tmp_path / "p.csv"))
    assert p.returncode != 0 and "no CUDA device" in p.stderr and not (tmp_path / "p.csv").exists()
