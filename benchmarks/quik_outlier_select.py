"""Which input channels QUIK should keep in fp16: the output error of the int4 activations alone,
per linear of SmolLM2-135M, under each way of choosing them (docs/accuracy.md, "Choosing QUIK's
outlier channels by mean square").

    python benchmarks/quik_outlier_select.py [--blocks 0,5,15,25,29] [--windows 16] [--json F]

The float model (``smollm2-135m``) reads ``--windows`` x 512 tokens of the C4 excerpt (the
calibration sampler of qconvert, seed 0); the inputs of q_proj, o_proj, gate_proj and down_proj of
the named blocks are kept.  For each linear and each rule, the K/16 channels (QUIK's "auto") stay
exact and the others go through the run-time quantizer of the QUIK reference (``dequantize_split``:
per-token asymmetric int4, clip 1 and 0.9; down_proj too, which quik-w4a4 runs in int8: the
probe compares rules, not presets); the figure is ||(X_q - X) W^T||^2 / ||X W^T||^2 with
the float weights, so only the activation side differs between rules.  Rules:

- ``amax``: largest max |x| over the tokens (the paper's, ``outlier_select = "amax"``);
- ``rms``: largest mean x^2, the Hessian's diagonal (``outlier_select = "rms"``);
- ``greedy``: a reference the pipeline cannot run (it needs every token): one channel at a time, the
  one whose removal lowers the sum over tokens of (max - min)^2 the most, i.e. the int4 step
  squared that per-token quantization pays;
- ``none``: no fp16 channel.

Prints a table and writes JSON (default benchmarks/results/quik_outlier_select.json).  A probe for
docs/accuracy.md, not a product path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memory import git_commit
from qconvert.calibration_text import calibration_tokens
from qconvert.layouts.quik import auto_outliers
from qconvert.source import resolve_source
from qconvert_kernels.quik.reference import dequantize_split

ROOT = Path(__file__).resolve().parent.parent
C4 = ROOT.parent / "shared" / "data" / "c4-en" / "c4-train.00000-of-01024.first1000.jsonl"
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
RULES = ("amax", "rms", "greedy", "none")


def greedy_mask(x: torch.Tensor, n: int) -> torch.Tensor:
    """n channels removed one at a time, each the one that most lowers sum_t (max_t - min_t)^2."""
    k = x.shape[1]
    mask = torch.zeros(k, dtype=torch.bool)
    for _ in range(n):
        hi, hi_i = torch.where(mask, -torch.inf, x).topk(2, dim=1)
        lo, lo_i = (-torch.where(mask, torch.inf, x)).topk(2, dim=1)
        lo = -lo
        r2 = (hi[:, 0] - lo[:, 0]) ** 2
        gain = torch.zeros(k, dtype=torch.float64)
        gain.index_add_(0, hi_i[:, 0], (r2 - (hi[:, 1] - lo[:, 0]) ** 2).double())
        lo_gain = r2 - (hi[:, 0] - lo[:, 1]) ** 2
        gain.index_add_(0, lo_i[:, 0], torch.where(hi_i[:, 0] == lo_i[:, 0], 0.0, lo_gain).double())
        gain[mask] = -torch.inf
        mask[int(gain.argmax())] = True
    return mask


def masks(x: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    def top(score):
        m = torch.zeros(x.shape[1], dtype=torch.bool)
        m[torch.argsort(score, descending=True, stable=True)[:n]] = True
        return m

    return {"amax": top(x.abs().amax(0)), "rms": top(x.double().pow(2).mean(0)), "greedy": greedy_mask(x, n),
            "none": torch.zeros(x.shape[1], dtype=torch.bool)}


def capture(blocks: list[int], windows: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    src = resolve_source("smollm2-135m")
    model, tok = src.load_model(), src.load_tokenizer()
    ids = calibration_tokens("c4", tok, windows, 512, seed=0, data_file=C4)
    inputs: dict[str, list[torch.Tensor]] = {}
    weights = {}
    for b in blocks:
        for name in LINEARS:
            mod = model.model.layers[b].get_submodule(name)
            key = f"{b}.{name.split('.')[1]}"
            weights[key] = mod.weight.detach().float()
            mod.register_forward_hook(lambda m, a, out, key=key: inputs.setdefault(key, []).append(
                a[0].detach().reshape(-1, a[0].shape[-1]).float()))
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i: i + 1])
    return {k: torch.cat(v) for k, v in inputs.items()}, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="0,5,15,25,29")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "quik_outlier_select.json"))
    args = ap.parse_args()
    inputs, weights = capture([int(b) for b in args.blocks.split(",")], args.windows)
    rows = []
    print(f"{'linear':<16} {'K':>5} {'fp16':>4}  " + "  ".join(f"{r + ' c=' + str(c):>14}" for r in RULES for c in (1, 0.9)))
    for key, x in inputs.items():
        w, n = weights[key], auto_outliers(x.shape[1])
        y2 = float((x @ w.T).pow(2).sum())
        err = {f"{rule} c={c}": float(((dequantize_split(x, m, 4, c) - x) @ w.T).pow(2).sum()) / y2
               for rule, m in masks(x, n).items() for c in (1.0, 0.9)}
        rows.append({"linear": key, "k": x.shape[1], "outliers": n, "tokens": x.shape[0], "relative_error": err})
        print(f"{key:<16} {x.shape[1]:>5} {n:>4}  " + "  ".join(f"{v:>14.5f}" for v in err.values()))
    Path(args.json).write_text(json.dumps({"probe": "quik_outlier_select", "commit": git_commit(),
                                           "windows": args.windows, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
