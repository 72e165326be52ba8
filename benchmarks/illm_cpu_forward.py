"""Time one forward of an I-LLM OUT's integer-only model on the CPU with each way of computing its
int8 GEMMs (``qconvert_kernels.illm.reference.gemm_path``): ``torch._int_mm``, exact float32
products over slices of K, one exact float64 product; check all give the same integer logits, and
name the one the runtime picks on this CPU (``cpu_gemm_path``).  Prints a table and writes JSON.

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
    default = ri.cpu_gemm_path()
    seconds, results = {}, {}
    for path in ri.GEMM_PATHS:
        with ri.gemm_path(path):
            timed(model, ids[:16])  # this path's own constants (float32 weights)
            seconds[path], results[path] = timed(model, ids)
    lg, sc = results[default]
    same = all(torch.equal(lg, a) and torch.equal(sc.m, s.m) and torch.equal(sc.k, s.k) for a, s in results.values())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    row = {"out": str(args.out), "scheme": (json.loads((args.out / "qconvert.json").read_text()).get("scheme") or {}).get("name"),
           "tokens": args.tokens, "seconds": {p: round(v, 2) for p, v in seconds.items()}, "default": default,
           "int8_dot_cpu": ri.cpu_has_int8_dot(), "same_integer_logits": same, "threads": torch.get_num_threads(),
           "cpu": torch.backends.cpu.get_cpu_capability(), "host": platform.machine(), "torch": torch.__version__,
           "commit": commit, "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    names = {"int_mm": "torch._int_mm", "float32": "float32 slices", "float64": "float64 product"}
    print(f"{'int8 GEMMs as':<28}{'seconds':>10}")
    for path in ri.GEMM_PATHS:
        print(f"{names[path] + (' (default here)' if path == default else ''):<28}{seconds[path]:>10.2f}")
    print(f"torch._int_mm on oneDNN here (AVX512-VNNI): {row['int8_dot_cpu']}; the same integer logits: {same}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=1) + "\n")
    if not same:
        raise SystemExit("the GEMM paths gave different integer logits")


if __name__ == "__main__":
    main()
