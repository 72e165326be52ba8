"""benchmarks/mma_peak.py (the mma.sync ceiling gpu_check.sh measures, part b) checked without a GPU:
its kernels build with the launchers' NVRTC options for every architecture the W4A8 kernels target,
their loops hold only tensor-core products and the loop counter (so the timing is the tensor cores'),
nothing spills, and the operation count per launch is the one the table divides by."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qconvert_kernels import compile as kc
from qconvert_kernels import launch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mma_peak", ROOT / "benchmarks" / "mma_peak.py")
mma_peak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mma_peak)


@pytest.mark.skipif(not kc.nvrtc_available(), reason="libnvrtc not found (pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_kernels_build_and_their_loops_are_only_mma(arch):
    path = launch.build(mma_peak.SOURCE, arch)
    report = kc.parse_ptxas(launch.build_log(path))
    assert set(report) == set(mma_peak.OPS)
    assert all((r["spill_stores"], r["spill_loads"], r["stack"]) == (0, 0, 0) for r in report.values()), report
    if kc.cuobjdump_path() is None:
        pytest.skip("cuobjdump/nvdisasm not found")
    sass = kc.kernel_sass(kc.sass(path))
    for name, mma in (("imma_peak", "IMMA.16832.S8.S8"), ("hmma_peak", "HMMA.16816.F32")):
        _, _, ops = kc.mma_loop(sass[name], mma)
        n_mma = ops[mma]
        assert n_mma % mma_peak.CHAINS == 0 and n_mma >= mma_peak.CHAINS, (arch, name, dict(ops))
        others = {op: c for op, c in ops.items() if op != mma}
        assert sum(others.values()) <= 5 and not [op for op in others if op.startswith(("LD", "ST"))], (arch, name, others)


def test_operation_count():
    # 132 SMs x 1 CTA, 4096 iterations of 8 IMMA per warp in 1 ms: 132 * 8 warps * 8 * 4096 * 8192 ops
    assert mma_peak.tera_ops("imma_peak", 132, 4096, 1e-3) == pytest.approx(132 * 8 * 8 * 4096 * 8192 / 1e-3 / 1e12)
    assert mma_peak.OPS == {"imma_peak": 8192, "hmma_peak": 4096}


def test_without_a_gpu_it_says_so(tmp_path):
    import torch

    from helpers import run_benchmark_without_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    p = run_benchmark_without_gpu(ROOT / "benchmarks" / "mma_peak.py", "--json", str(tmp_path / "m.json"))
    assert p.returncode != 0 and "no CUDA device" in p.stderr and not (tmp_path / "m.json").exists()


def test_imma_checksums_lane_by_lane():
    """The CPU model of imma_peak's output (the GPU run compares against it) from an independent
    per-element product: each lane's registers placed by the PTX ISA's m16n8k32 .s8 fragment table
    (a_r byte i = A[gid + 8 (r & 1)][4 tig + i + 16 (r >> 1)], b_r byte i = B[4 tig + i + 16 r][gid],
    c_r = C[gid + 8 (r >> 1)][2 tig + (r & 1)]), C = A B in int64, CHAINS x iters of it summed per lane
    and wrapped to int32.  The sums differ lane to lane, and another operand changes them: the
    comparison on the GPU can fail."""
    import numpy as np

    n, iters = 64, 4096
    a, b = mma_peak.imma_operands(n)
    got = mma_peak.imma_checksums(n, iters)
    for w in range(n // 32):
        A, B = np.zeros((16, 32), np.int64), np.zeros((32, 8), np.int64)
        by = lambda reg, i: np.int64(np.int8(np.uint8((int(reg) >> (8 * i)) & 0xFF)))  # noqa: E731
        for lane in range(32):
            gid, tig = lane >> 2, lane & 3
            for r in range(4):
                for i in range(4):
                    A[gid + 8 * (r & 1), 4 * tig + i + 16 * (r >> 1)] = by(a[32 * w + lane, r], i)
            for r in range(2):
                for i in range(4):
                    B[4 * tig + i + 16 * r, gid] = by(b[32 * w + lane, r], i)
        C = A @ B
        for lane in range(32):
            gid, tig = lane >> 2, lane & 3
            tot = sum(int(C[gid + 8 * (r >> 1), 2 * tig + (r & 1)]) for r in range(4)) * mma_peak.CHAINS * iters
            assert got[32 * w + lane] == np.int64(tot & 0xFFFFFFFF).astype(np.uint32).view(np.int32), (w, lane)
    assert len(set(got.tolist())) > n // 2
    assert not np.array_equal(mma_peak.imma_checksums(n, iters, seed=54321), got)

