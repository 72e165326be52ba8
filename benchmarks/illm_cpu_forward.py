"""Time one forward of an I-LLM OUT's integer-only model on the CPU, with the int8 GEMMs as exact
float32 products over slices of K (the default on the CPU), as one exact float64 product
(``float64_gemm_only()``) and as ``torch._int_mm`` (``int_mm_only()``), and check all three give
the same integer logits.  Prints a table and writes JSON.

    python benchmarks/illm_cpu_forward.py OUT [--tokens 512] [--json benchmarks/results/illm_cpu_forward.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from qconvert import load
from qconvert_kernels.illm import reference as ri

ROOT = Path(__file__).resolve().parents[1]


def timed(model, ids: torch.Tensor):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.forward_int(ids)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="an OUT quantized with an illm-* scheme")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "illm_cpu_forward.json")
    args = ap.parse_args()
    model = load(args.out)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.tokens,), generator=torch.Generator().manual_seed(0))
    timed(model, ids[:16])  # warm-up: lazily built constants
    default_s, (lg, sc) = timed(model, ids)
    with ri.float64_gemm_only():
        f64_s, (lg1, sc1) = timed(model, ids)
    with ri.int_mm_only():
        int_mm_s, (lg2, sc2) = timed(model, ids)
    same = all(torch.equal(lg, a) and torch.equal(sc.m, b.m) and torch.equal(sc.k, b.k) for a, b in ((lg1, sc1), (lg2, sc2)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    row = {"out": str(args.out), "scheme": (json.loads((args.out / "qconvert.json").read_text()).get("scheme") or {}).get("name"),
           "tokens": args.tokens, "float32_gemm_s": round(default_s, 2), "float64_gemm_s": round(f64_s, 2),
           "int_mm_s": round(int_mm_s, 2), "speedup": round(int_mm_s / default_s, 2), "same_integer_logits": same,
           "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
           "host": platform.machine(), "torch": torch.__version__, "commit": commit,
           "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(f"{'int8 GEMMs as':<24}{'seconds':>10}")
    print(f"{'float32 slices (default)':<24}{default_s:>10.2f}")
    print(f"{'float64 product':<24}{f64_s:>10.2f}")
    print(f"{'torch._int_mm':<24}{int_mm_s:>10.2f}")
    print(f"speed-up over torch._int_mm {row['speedup']}x; the same integer logits: {same}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=1) + "\n")
    if not same:
        raise SystemExit("the GEMM paths gave different integer logits")


if __name__ == "__main__":
    main()
