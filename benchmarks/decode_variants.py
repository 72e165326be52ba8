"""What each decode change buys, measured in one GPU run: the W4A8-IS decode kernel at M = 1 and 4 on
the Llama-3-8B shapes, CUDA-graph timed (qconvert.bench's method), under these variants:

  before       the plan the H200 measured on 2026-12-04: split count rounded up to two CTAs per SM
               (a partial second wave), the amax exchanged between CTAs
  one-wave     the split count rounded down (every CTA resident at once), the exchange kept
  own-amax     the old split count, every CTA taking the amax itself
  no-prefetch  today's plan on the kernel built with -D W4R_SCALE_AHEAD=0: the group scales read one
               group ahead only, as the H200 ran them (the L2 prefetch of 2026-12-05 left out; group
               g0's scales are read before the amax in both)
  stages-16    today's plan on the kernel built with -D W4R_D_STAGES=16: 15 k64 blocks of weights in
               flight per warp instead of 7 (64 KB of shared memory per CTA for them instead of 32;
               two CTAs per SM still fit an H100 / H200), the prefetch kept
  now          what ``cuda.plan`` gives today, on the kernel as built for the launchers

The first three were measured (docs/benchmarks.md, 2026-12-04); by default the script runs the last
three (``--variants all`` runs all six).  Every variant's output must equal the current one's bit for
bit (integer scales: the int32 sums depend on neither the split, the prefetch nor the pipeline's
depth), which the script checks.  A benchmark, not a test: prints a table and writes JSON.  Needs cupy and an sm_80+ GPU
(benchmarks/gpu_check.sh, part b).

    python benchmarks/decode_variants.py --json decode_variants.json [--m 1,4] [--variants all]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q/o_proj": (4096, 4096), "qkv_proj": (6144, 4096), "gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}
VARIANTS = ("before", "one-wave", "own-amax", "no-prefetch", "stages-16", "now")
DEFAULT_VARIANTS = ("no-prefetch", "stages-16", "now")
# variants of the kernel's build, on today's plan, and the weight stages' shared memory each launches with
KERNEL_DEFINES = {"no-prefetch": {"W4R_SCALE_AHEAD": 0}, "stages-16": {"W4R_D_STAGES": 16}}
KERNEL_W_BYTES = {"stages-16": 16 * 8 * 512}   # cuda.D_W_BYTES: D_STAGES x 8 warps x 512 B

sys.path.insert(0, str(ROOT))
from qconvert_kernels.roofline import decode_splits  # noqa: E402
from qconvert_kernels.w4a8 import cuda as _cuda  # noqa: E402

_PLAN = _cuda.plan   # today's plan, kept before run() puts each variant in its place


def variant_source(variant: str, folder: Path) -> Path:
    """w4a8_repacked.cu as ``variant`` builds it, written into ``folder``: the variant's macros, then
    the source's text with its includes inlined (compile.kernel_source), in a file of the same name.
    launch.build caches the cubin by the text, so the variant is a module of its own, and the folder
    may go once the module is loaded."""
    from qconvert_kernels import compile as kc

    path = Path(folder) / variant / _cuda.SOURCE_R.name
    path.parent.mkdir(parents=True, exist_ok=True)
    defines = "".join(f"#define {k} {v}\n" for k, v in KERNEL_DEFINES[variant].items())
    path.write_text(f"// benchmarks/decode_variants.py: {variant}\n{defines}{kc.kernel_source(_cuda.SOURCE_R)}")
    return path


@contextlib.contextmanager
def variant(v: str, sources: dict):
    """cuda.linear as variant ``v`` runs: its plan, its build of the source (``sources``: variant ->
    variant_source's file) and the shared memory its weight stages take; all restored after."""
    saved = (_cuda.plan, _cuda.SOURCE_R, _cuda.D_W_BYTES)
    _cuda.plan = lambda mm, p, s, *prefill: variant_plan(v, mm, p, s)   # decode only: M <= 4
    _cuda.SOURCE_R = sources.get(v, saved[1])
    _cuda.D_W_BYTES = KERNEL_W_BYTES.get(v, saved[2])
    try:
        yield
    finally:
        _cuda.plan, _cuda.SOURCE_R, _cuda.D_W_BYTES = saved


def variant_plan(variant: str, m: int, prep, sms: int):
    """The decode plan of ``variant`` for M = m tokens: the split and amax rules of cuda.plan with
    or without each 2026-12-04 change (roofline.decode_splits' one_wave, cuda.amax_plan's own)."""
    now = _PLAN(m, prep, sms)
    if variant == "now" or variant in KERNEL_DEFINES or now.kind != "decode":
        return now
    s = decode_splits(prep.n, prep.k, m, prep.group_size, sms, one_wave=variant == "one-wave")
    a, ak = _cuda.amax_plan(m, prep.k, min(s * prep.tiles, sms), own=variant == "own-amax")
    gq, gr = divmod(prep.n_groups, s)
    return dataclasses.replace(now, grid=(s, prep.tiles), splits=s, gq=gq, gr=gr, amax_ctas=a, ak_log2=ak,
                               part_int4=s * prep.tiles * 8 * now.mt8 * 32 if s > 1 else 0)


def run(ms: list[int], variants=DEFAULT_VARIANTS) -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_kernels_w4a8_emulate import activations, make_layer

    from qconvert.bench import _time_cuda
    from qconvert_kernels.w4a8 import cuda

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tmp = tempfile.TemporaryDirectory(prefix="qconvert-variants-")
    sources = {v: variant_source(v, Path(tmp.name)) for v in variants if v in KERNEL_DEFINES}
    rows = []
    try:
        for i, (name, (n, k)) in enumerate(SHAPES.items()):
            prep = cuda.prepare("w4a8-is", {a: b.to(dev) for a, b in make_layer(n, k, 128, "w4a8-is", 3).items()}, 128, dev)
            for j, m in enumerate(ms):
                x = activations(m, k, torch.float16, 5).to(dev)
                want = cuda.linear(x, prep)
                # the variants in turn, the order reversed every other case (no variant always first)
                for v in variants if (i + j) % 2 == 0 else variants[::-1]:
                    with variant(v, sources):
                        same = torch.equal(cuda.linear(x, prep), want)
                        t = _time_cuda(lambda i: cuda.linear(x, prep), 1, runs=50, warmup=3, reps=20)
                        pl = cuda.plan(m, prep, sms)
                    rows.append({"shape": name, "N": n, "K": k, "M": m, "variant": v, "us": round(t.median_us, 2),
                                 "timing": t.mode, "ctas": pl.grid[0] * pl.grid[1], "splits": pl.splits,
                                 "amax_ctas": pl.amax_ctas, "smem": pl.smem, "equal_to_now": same})
                    r = rows[-1]
                    print(f"{name:13s} M {m}  {v:11s} {r['us']:>8.2f} us  {r['ctas']:>4} CTAs  A={r['amax_ctas']:<3} "
                          f"{'' if same else 'MISMATCH'}", flush=True)
    finally:
        tmp.cleanup()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,4")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}, or all")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    variants = VARIANTS if args.variants == "all" else tuple(v.strip() for v in args.variants.split(","))
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; use some of {', '.join(VARIANTS)}, or all")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times the GPU kernels")
    rows = run([int(v) for v in args.m.split(",")], variants)
    from qconvert.bench import environment

    meta = {"environment": environment(torch.device("cuda")), "layout": "w4a8-is", "group_size": 128,
            "method": "median of 50 replays of a CUDA graph of 20 launches (qconvert.bench)"}
    with open(args.json, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    if not all(r["equal_to_now"] for r in rows):
        raise SystemExit("a variant's output differs from the current plan's")


if __name__ == "__main__":
    main()
