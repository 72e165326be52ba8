"""The mma.sync ceiling of this GPU: how many int8 (IMMA m16n8k32) and fp16 (HMMA m16n8k16, float
accumulators) tensor-core operations per second a kernel that does nothing else reaches
(benchmarks/mma_peak.cu), at 8, 16 and 32 warps per SM.  The W4A8 kernels are built on mma.sync;
Hopper's datasheet peak (1,979 int8 TOPS on an H100 / H200 SXM) is reached only through wgmma, so
the W4A8 prefill's efficiency is read against this measured ceiling (docs/kernels.md).  A
benchmark, not a test: prints a table and writes JSON.  Needs cupy and an sm_80+ GPU
(benchmarks/gpu_check.sh, part b).

    python benchmarks/mma_peak.py --json mma_peak.json [--iters 4096]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".cu")
CHAINS = 8                       # mma_peak.cu: independent products per warp per iteration
OPS = {"imma_peak": 2 * 16 * 8 * 32, "hmma_peak": 2 * 16 * 8 * 16}   # operations (multiply + add) per mma
LABEL = {"imma_peak": "int8 mma.sync m16n8k32 (IMMA)", "hmma_peak": "fp16 mma.sync m16n8k16, f32 acc (HMMA)"}


def tera_ops(kernel: str, blocks: int, iters: int, seconds: float) -> float:
    """Tensor-core operations per second (10^12) of one launch: blocks x 8 warps x CHAINS x iters mma."""
    return blocks * 8 * CHAINS * iters * OPS[kernel] / seconds / 1e12


SEED = 12345


def imma_operands(n_threads: int, seed: int = SEED):
    """Each thread's A and B registers in imma_peak, from its global index (mma_peak.cu's index math)."""
    import numpy as np

    v = (np.uint32(seed) ^ np.arange(n_threads, dtype=np.uint32)).astype(np.uint32)
    a = np.stack([v, v ^ np.uint32(0x00010001), v ^ np.uint32(0x00020002), v ^ np.uint32(0x00030003)], -1)
    b = np.stack([v ^ np.uint32(0x00040004), v ^ np.uint32(0x00050005)], -1)
    return a, b


def imma_checksums(n_threads: int, iters: int, seed: int = SEED):
    """What imma_peak writes for each of n_threads threads, lane by lane on the CPU: the warp's
    m16n8k32 product (the emulator's PTX fragment model, qconvert_kernels/w4a8/emulate.py) added
    iters times into each of CHAINS accumulators, then the wrapping int32 sum of the lane's 4 x CHAINS
    registers."""
    import numpy as np

    from qconvert_kernels.w4a8.emulate import mma_m16n8k32, wrap32

    a, b = imma_operands(n_threads, seed)
    warps = n_threads // 32
    d = mma_m16n8k32(a.reshape(warps, 32, 4), b.reshape(warps, 32, 2), np.zeros((warps, 32, 4), np.int32), zero_c=True)
    return wrap32(CHAINS * iters * d.astype(np.int64).sum(-1)).reshape(-1)


def run(iters: int) -> list[dict]:
    from qconvert_kernels import launch

    dev = torch.device("cuda")
    sms = launch.sm_count()
    rows = []
    for kernel in ("imma_peak", "hmma_peak"):
        for per_sm in (1, 2, 4):                      # CTAs of 256 threads per SM: 8, 16, 32 warps
            blocks = sms * per_sm
            out = torch.empty(blocks * 256, dtype=torch.int32 if kernel == "imma_peak" else torch.float32, device=dev)
            args = (launch.ptr(out), launch.i32(iters), launch.i32(SEED))
            go = lambda: launch.launch(SOURCE, kernel, (blocks, 1, 1), (256, 1, 1), args, dev)  # noqa: E731
            go()
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                go()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            t = sorted(times)[len(times) // 2]
            exact = None  # IMMA: the products the tensor cores made, against the lane-by-lane CPU model
            if kernel == "imma_peak":
                exact = bool((out.cpu().numpy() == imma_checksums(blocks * 256, iters)).all())
            rows.append({"kernel": kernel, "op": LABEL[kernel], "warps_per_sm": 8 * per_sm, "blocks": blocks,
                         "iters": iters, "ms": round(t * 1e3, 3), "tops": round(tera_ops(kernel, blocks, iters, t), 1),
                         "equal_to_cpu_model": exact})
            r = rows[-1]
            print(f"{r['op']:40s} {r['warps_per_sm']:>3} warps/SM  {r['ms']:>8.3f} ms  {r['tops']:>8.1f} TOPS", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=4096)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times the GPU's tensor cores")
    rows = run(args.iters)
    from qconvert.bench import environment

    best = {k: max(r["tops"] for r in rows if r["kernel"] == k) for k in OPS}
    env = environment(torch.device("cuda"))
    with open(args.json, "w") as f:
        json.dump({"environment": env, "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
                   "method": f"median of 5 launches, CUDA events; {CHAINS} independent mma per warp per iteration, register operands",
                   "best_tops": best, "rows": rows}, f, indent=1)
    print(f"best: int8 IMMA {best['imma_peak']} TOPS, fp16 HMMA {best['hmma_peak']} TFLOPS ({env['device']})")
    if any(r["equal_to_cpu_model"] is False for r in rows):
        raise SystemExit("imma_peak's sums differ from the CPU model: its timing is not of the products it claims")


if __name__ == "__main__":
    main()
