"""Batched decoding with an I-LLM OUT's integer-only model: for each batch size B, a prefill of B
random P-token prompts, then N greedy steps on the integer KV cache (the engine ``qconvert
generate`` runs), timed per step; and a check that the first and the last row of the largest batch
get, bit for bit, the logits they get alone (batch 1).  Prints a table and writes JSON.

    python benchmarks/illm_batch_decode.py OUT [--prompt 128] [--steps 6] [--batches 1,4,16]
        [--device cpu|cuda] [--json benchmarks/results/illm_batch_decode.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qconvert import load
from qconvert.bench import environment

ROOT = Path(__file__).resolve().parents[1]


def run(model, ids: torch.Tensor, steps: int, clock) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, seconds per decode step, logits [steps + 1, B, V]) of ``ids`` [B, P]."""
    b, p = ids.shape
    eng = model.decode_engine(b, p + steps + 1)
    t0 = clock()
    logits = [eng.prefill(ids)]
    prefill = clock() - t0
    # (clones: with CUDA graphs, the engine's default on a GPU, decode returns its reused logits buffer)
    logits.append(eng.decode(logits[-1].argmax(-1)).clone())  # the first step untimed (warm-up, a graph's capture)
    t0 = clock()
    for _ in range(steps - 1):
        logits.append(eng.decode(logits[-1].argmax(-1)).clone())
    return prefill, (clock() - t0) / (steps - 1), torch.stack(logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="an OUT quantized with an illm-* scheme")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row (random ids)")
    ap.add_argument("--steps", type=int, default=6, help="greedy decode steps (the first one untimed)")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--device", default="cpu", help="cpu (torch integer ops) or cuda (the I-LLM kernels)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "illm_batch_decode.json")
    args = ap.parse_args()
    batches = sorted({int(b) for b in args.batches.split(",")})
    if args.prompt < 1 or args.steps < 2 or batches[0] < 1:
        raise SystemExit("--prompt and --batches must be at least 1, --steps at least 2")
    model = load(args.out, device=args.device)
    if not hasattr(model, "decode_engine") or not hasattr(model, "forward_int"):
        raise SystemExit(f"{args.out} is not an I-LLM OUT (its model has no integer runtime)")
    dev = model.device

    def clock() -> float:  # the GPU's queue drained first
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    ids = torch.randint(0, model.config.vocab_size, (max(batches), args.prompt),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    rows, last = [], None
    with torch.inference_mode():
        run(model, ids[:1, :8], 2, clock)  # warm-up
        for b in batches:
            prefill, step, logits = run(model, ids[:b], args.steps, clock)
            rows.append({"batch": b, "prefill_s": round(prefill, 3), "step_s": round(step, 4),
                         "tokens_per_s": round(b / step, 2)})
            last = logits
        pick = sorted({0, batches[-1] - 1})
        same = all(torch.equal(run(model, ids[r:r + 1], args.steps, clock)[2][:, 0], last[:, r]) for r in pick)
    scheme = (json.loads((args.out / "qconvert.json").read_text()).get("scheme") or {}).get("name")
    result = {"out": str(args.out), "scheme": scheme, "prompt_tokens": args.prompt, "steps": args.steps, "rows": rows,
              "rows_equal_alone": same, "environment": environment(dev), "cpu": torch.backends.cpu.get_cpu_capability()}
    print(f"{scheme}: {args.prompt} prompt tokens per row, {args.steps} greedy steps ({result['environment']['device']})")
    print(f"{'batch':>6}{'prefill s':>11}{'step s':>9}{'tokens/s':>10}")
    for r in rows:
        print(f"{r['batch']:>6}{r['prefill_s']:>11.3f}{r['step_s']:>9.4f}{r['tokens_per_s']:>10.2f}")
    print(f"rows of batch {batches[-1]} bit-identical to the same rows alone: {same}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not same:
        raise SystemExit("a row of the batch gave other logits than alone")


if __name__ == "__main__":
    main()
