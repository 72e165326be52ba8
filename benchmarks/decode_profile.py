"""Where the decode engine's CPU time goes at --calib self's batch (a profile, not a test).

SmolLM2-135M in float32, batch 128, ``--fill`` cache columns filled first, then ``--steps``
decode steps under torch's profiler, each sampled as ``--calib self`` samples
(qconvert.calibration_text.sample).  Prints seconds per step and the top operators by self
CPU time.

    python benchmarks/decode_profile.py [--fill 200] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from qconvert.calibration_text import sample
from qconvert.engine import DecodeEngine
from qconvert.source import resolve_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fill", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    model = resolve_source("smollm2-135m").load_model(torch.float32).eval()
    eng = DecodeEngine(model, max_batch=args.batch, max_len=args.fill + args.steps + 2)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        logits = eng.prefill(torch.randint(100, 40000, (args.batch, 1), generator=g))
        for _ in range(args.fill):
            logits = eng.decode(logits.argmax(-1))
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                logits = eng.decode(sample(logits.float(), g))
        per_step = (time.perf_counter() - t0) / args.steps
    print(f"{per_step:.3f} s per decode step (batch {args.batch}, {args.fill} columns filled, profiler on)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
