"""Time of the online Hadamard transform (``--rotate hadamard+online``) on a GPU: the CUDA kernel
qconvert_kernels/hadamard/hadamard.cu per call, against the time a row-major fp16 copy of the same
bytes takes (the memory floor: read x, write y), for the intermediate sizes of SmolLM2-135M
(1536) and Llama-3-8B (14336) and M tokens per call.  A benchmark, not a test: prints a table
and writes JSON.  Needs cupy and an sm_80+ GPU (benchmarks/gpu_check.sh, part e).

    python benchmarks/hadamard_speed.py --json hadamard.json [--m 1,16,256,4096] [--orders 1536,14336]
"""

from __future__ import annotations

import argparse
import json

import torch


def _time_us(fn) -> tuple[float, str]:
    """Median µs per call of ``fn`` over 50 replays of a CUDA graph of 20 calls (qconvert.bench's
    method), so the host's cost of a call through the Python launcher stays out; eager (labelled)
    if capture fails.  The first H200 run (2026-12-04) timed eagerly: its small-M figures, about
    60 µs, were that host cost, not the kernel's."""
    from qconvert.bench import _time_cuda

    t = _time_cuda(lambda i: fn(), 1, runs=50, warmup=3, reps=20)
    return t.median_us, t.mode


def main() -> None:
    from qconvert.bench import environment
    from qconvert.online_hadamard import OnlineHadamard

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,256,4096")
    ap.add_argument("--orders", default="1536,14336")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times the GPU kernel")
    rows = []
    for n in (int(v) for v in args.orders.split(",")):
        t = OnlineHadamard(n)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, n, device="cuda", dtype=torch.float16)
            y = torch.empty_like(x)
            kernel, mode = _time_us(lambda: t(x))
            copy, _ = _time_us(lambda: y.copy_(x))
            rows.append({"order": n, "factors": f"{t.m} x {1 << t.lp}", "m": m, "kernel_us": round(kernel, 2),
                         "copy_us": round(copy, 2), "gb_per_s": round(4 * m * n / (kernel * 1e-6) / 1e9, 1),
                         "timing": mode})
            r = rows[-1]
            print(f"order {n:>6} ({r['factors']:>9})  M {m:>5}  kernel {r['kernel_us']:>9.2f} us  "
                  f"copy {r['copy_us']:>8.2f} us  {r['gb_per_s']:>7.1f} GB/s", flush=True)
    with open(args.json, "w") as f:
        json.dump({"environment": environment(torch.device("cuda")), "rows": rows}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
