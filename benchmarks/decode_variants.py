"""What each of the 2026-12-04 decode changes buys, measured in one GPU run: the W4A8-IS decode kernel
at M = 1 and 4 on the Llama-3-8B shapes, under four launch plans of the same kernel, CUDA-graph
timed (qconvert.bench's method):

  before      the plan the H200 measured on 2026-12-04: split count rounded up to two CTAs per SM
              (a partial second wave), the amax exchanged between CTAs
  one-wave    the split count rounded down (every CTA resident at once), the exchange kept
  own-amax    the old split count, every CTA taking the amax itself
  now         both: what ``cuda.plan`` gives today

Every variant's output must equal the current plan's bit for bit (integer scales: the int32 sums do
not depend on the split), which the script checks.  A benchmark, not a test: prints a table and
writes JSON.  Needs cupy and an sm_80+ GPU (benchmarks/gpu_check.sh, part b).

    python benchmarks/decode_variants.py --json decode_variants.json [--m 1,4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q/o_proj": (4096, 4096), "qkv_proj": (6144, 4096), "gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}
VARIANTS = ("before", "one-wave", "own-amax", "now")

sys.path.insert(0, str(ROOT))
from qconvert_kernels.roofline import decode_splits  # noqa: E402
from qconvert_kernels.w4a8 import cuda as _cuda  # noqa: E402

_PLAN = _cuda.plan   # today's plan, kept before run() puts each variant in its place


def variant_plan(variant: str, m: int, prep, sms: int):
    """The decode plan of ``variant`` for M = m tokens: the split and amax rules of cuda.plan with
    or without each 2026-12-04 change (roofline.decode_splits' one_wave, cuda.amax_plan's own)."""
    now = _PLAN(m, prep, sms)
    if variant == "now" or now.kind != "decode":
        return now
    s = decode_splits(prep.n, prep.k, m, prep.group_size, sms, one_wave=variant == "one-wave")
    a, ak = _cuda.amax_plan(m, prep.k, min(s * prep.tiles, sms), own=variant == "own-amax")
    gq, gr = divmod(prep.n_groups, s)
    return dataclasses.replace(now, grid=(s, prep.tiles), splits=s, gq=gq, gr=gr, amax_ctas=a, ak_log2=ak,
                               part_int4=s * prep.tiles * 8 * now.mt8 * 32 if s > 1 else 0)


def run(ms: list[int]) -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_kernels_w4a8_emulate import activations, make_layer

    from qconvert.bench import _time_cuda
    from qconvert_kernels.w4a8 import cuda

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    orig = cuda.plan
    rows = []
    try:
        for name, (n, k) in SHAPES.items():
            prep = cuda.prepare("w4a8-is", {a: b.to(dev) for a, b in make_layer(n, k, 128, "w4a8-is", 3).items()}, 128, dev)
            for m in ms:
                x = activations(m, k, torch.float16, 5).to(dev)
                cuda.plan = orig
                want = cuda.linear(x, prep)
                for v in VARIANTS:
                    cuda.plan = lambda mm, p, s, v=v: variant_plan(v, mm, p, s)  # noqa: E731
                    same = torch.equal(cuda.linear(x, prep), want)
                    t = _time_cuda(lambda i: cuda.linear(x, prep), 1, runs=50, warmup=3, reps=20)
                    pl = variant_plan(v, m, prep, sms)
                    rows.append({"shape": name, "N": n, "K": k, "M": m, "variant": v, "us": round(t.median_us, 2),
                                 "timing": t.mode, "ctas": pl.grid[0] * pl.grid[1], "splits": pl.splits,
                                 "amax_ctas": pl.amax_ctas, "equal_to_now": same})
                    r = rows[-1]
                    print(f"{name:13s} M {m}  {v:9s} {r['us']:>8.2f} us  {r['ctas']:>4} CTAs  A={r['amax_ctas']:<3} "
                          f"{'' if same else 'MISMATCH'}", flush=True)
    finally:
        cuda.plan = orig
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,4")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times the GPU kernels")
    rows = run([int(v) for v in args.m.split(",")])
    from qconvert.bench import environment

    meta = {"environment": environment(torch.device("cuda")), "layout": "w4a8-is", "group_size": 128,
            "method": "median of 50 replays of a CUDA graph of 20 launches (qconvert.bench)"}
    with open(args.json, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    if not all(r["equal_to_now"] for r in rows):
        raise SystemExit("a variant's output differs from the current plan's")


if __name__ == "__main__":
    main()
