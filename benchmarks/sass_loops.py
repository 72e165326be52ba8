"""Instructions per tensor-core instruction in the main loop of repacked W4A8 GEMMs (the loop of its
SASS with the most IMMA: the prefill's g = 128 stage loop; a decode kernel's such loop also holds
the activation-chunk quantizer, so there only the registers column says much), static counts over
the loop's body, and registers, for the launchers' NVRTC builds and, where nvcc is installed, nvcc's.
The ZeroQuant-FP kernels of fp8/fp8_repacked.cu (``w4a8r_decode_zq_m*``, sm_89 / sm_90 only) count
their tensor-core instruction there: QMMA on sm_89, HMMA on sm_90 (two per FP8 mma).
docs/kernels.md quotes these; tests/test_kernels_families.py bounds the prefill's.  Needs
cuobjdump (the [test] extra) and NVRTC or nvcc; no GPU.

    python benchmarks/sass_loops.py [--archs sm_80,sm_89,sm_90] [--kernels w4a8r_prefill_is,w4a8r_prefill_fs,...]
    python benchmarks/sass_loops.py --archs sm_89,sm_90 --kernels w4a8r_decode_fs_m8,w4a8r_decode_zq_m8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from qconvert_kernels import compile as kc
from qconvert_kernels import launch
from qconvert_kernels.fp8 import REPACKED as ZQ
from qconvert_kernels.w4a8 import REPACKED


def mma_prefix(kernel: str, arch: str) -> str:
    """The SASS tensor-core instruction of the kernel's products on ``arch``."""
    if kernel in ZQ.kernels:
        return "QMMA" if arch == "sm_89" else "HMMA"
    return "IMMA"


def loop_counts(sass_text: str, prefix: str = "IMMA") -> tuple[int, int]:
    """(instructions, tensor-core instructions) of the kernel's main loop."""
    _, _, ops = kc.mma_loop(sass_text, prefix)
    return sum(ops.values()), sum(c for op, c in ops.items() if op.startswith(prefix))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="sm_80,sm_89,sm_90")
    ap.add_argument("--kernels", default="w4a8r_prefill_is,w4a8r_prefill_fs,w4a8r_prefill_is_bm64,w4a8r_prefill_fs_bm64")
    args = ap.parse_args()
    kernels = args.kernels.split(",")
    print(f"{'build':14s} {'kernel':22s} {'instructions':>12s} {'IMMA':>5s} {'per IMMA':>8s} {'registers':>9s}"
          "   (ZQ kernels: QMMA on sm_89, HMMA on sm_90)")
    for arch in args.archs.split(","):
        for source in (REPACKED, ZQ):
            mine = [k for k in kernels if k in source.kernels and arch in source.archs]
            if not mine:
                continue
            builds = []
            if kc.nvrtc_available():
                path = launch.build(source.path, arch)
                builds.append((f"NVRTC {arch}", path, kc.parse_ptxas(launch.build_log(path))))
            if kc.nvcc_path():
                path = kc.compile_cubin(arch, Path(tempfile.mkdtemp()), source=source.path)
                builds.append((f"nvcc {arch}", path, kc.parse_ptxas(kc.ptxas_log(path))))
            for name, path, report in builds:
                sass = kc.kernel_sass(kc.sass(path))
                for k in mine:
                    if k not in source.gemms:  # no tensor-core loop (ZQ's widening, LoRC's h): registers only
                        print(f"{name:14s} {k:22s} {'-':>12s} {'-':>5s} {'-':>8s} {report[k]['registers']:>9d}")
                        continue
                    n, m = loop_counts(sass[k], mma_prefix(k, arch))
                    print(f"{name:14s} {k:22s} {n:>12d} {m:>5d} {n / m:>8.2f} {report[k]['registers']:>9d}")


if __name__ == "__main__":
    main()
