"""Decode speed of an I-LLM OUT's integer-only model (on the CPU, or a GPU with --device cuda): N
greedy tokens after a P-token prompt with the integer KV cache (what ``qconvert generate`` runs),
against running the whole sequence again for every token (generation before the cache), with a
check that both pick the same tokens from bit-identical logits.  Prints a table and writes JSON.

    python benchmarks/illm_decode.py OUT [--prompt 128] [--new-tokens 16] [--device cpu|cuda]
        [--json benchmarks/results/illm_decode.json]
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

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="an OUT quantized with an illm-* scheme")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (random ids)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu (torch integer ops) or cuda (the I-LLM kernels)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "illm_decode.json")
    args = ap.parse_args()
    if args.prompt < 1 or args.new_tokens < 2:
        raise SystemExit("--prompt must be at least 1 and --new-tokens at least 2")
    model = load(args.out, device=args.device)
    if not hasattr(model, "decode_engine"):
        raise SystemExit(f"{args.out} is not an I-LLM OUT (its model has no integer runtime)")
    dev = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(dev)
    n = args.new_tokens

    def clock() -> float:  # the GPU's queue drained first
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    with torch.inference_mode():
        model(ids[:, :8])  # warm-up
        t0 = clock()
        res = model(ids, use_cache=True)
        prefill_s = clock() - t0
        cache, cached = res.past_key_values, [res.logits[0, -1]]
        t0 = clock()
        for _ in range(n - 1):
            nxt = cached[-1].argmax().reshape(1, 1)
            cached.append(model(nxt, past_key_values=cache, use_cache=True).logits[0, -1])
        cached_s = clock() - t0
        seq, again, steps = ids, [], []
        for _ in range(n):
            t0 = clock()
            again.append(model(seq).logits[0, -1])
            steps.append(clock() - t0)
            seq = torch.cat([seq, again[-1].argmax().reshape(1, 1)], 1)
    same = all(torch.equal(a, b) for a, b in zip(cached, again))
    per_cached, per_again = cached_s / (n - 1), sum(steps[1:]) / (n - 1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    scheme = (json.loads((args.out / "qconvert.json").read_text()).get("scheme") or {}).get("name")
    row = {"out": str(args.out), "scheme": scheme, "prompt_tokens": args.prompt, "new_tokens": n,
           "prefill_s": round(prefill_s, 3), "cached_step_s": round(per_cached, 4), "recompute_step_s": round(per_again, 4),
           "speedup": round(per_again / per_cached, 1), "cache_bytes": cache.nbytes(), "same_logits": same,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(), "host": platform.machine(),
           "torch": torch.__version__, "commit": commit, "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(f"{scheme}: {args.prompt} prompt tokens, then {n} greedy tokens (prefill {prefill_s:.2f} s)")
    print(f"{'decode step':<34}{'seconds':>10}{'tokens/s':>10}")
    print(f"{'integer KV cache':<34}{per_cached:>10.4f}{1 / per_cached:>10.2f}")
    print(f"{'whole sequence again':<34}{per_again:>10.4f}{1 / per_again:>10.2f}")
    print(f"speed-up {row['speedup']}x; cache {cache.nbytes() / 1024:.0f} KiB; bit-identical logits: {same}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=1) + "\n")
    if not same:
        raise SystemExit("the cached steps gave other logits than the whole sequence")


if __name__ == "__main__":
    main()
