"""benchmarks/sass_loops.py, the command docs/kernels.md gives for the prefill's main-loop counts:
it runs here (no GPU) and prints each build's loop, 64 IMMA, with its registers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qconvert_kernels import compile as kc

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not kc.nvrtc_available() or kc.cuobjdump_path() is None, reason="needs NVRTC and cuobjdump")
def test_prints_the_prefill_loop_of_each_build():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_loops.py"), "--archs", "sm_90"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = re.findall(r"^(NVRTC|nvcc) sm_90\s+(w4a8r_prefill_(?:is|fs))\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)$", p.stdout, re.M)
    assert {(b, k) for b, k, *_ in rows} >= {("NVRTC", "w4a8r_prefill_is"), ("NVRTC", "w4a8r_prefill_fs")}, p.stdout
    assert all(int(m) == 64 and abs(int(n) / 64 - float(r)) < 0.01 and 0 < int(regs) <= 255 for _, _, n, m, r, regs in rows)
