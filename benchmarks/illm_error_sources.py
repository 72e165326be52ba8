"""Where an I-LLM output loses accuracy: WikiText-2 perplexity of one OUT run three ways.

    python benchmarks/illm_error_sources.py OUT --data-file wiki.test.raw [--seqlen 512] [--max-windows 40]
                                            [--modes integer,float,weights]

``integer``: the integer-only model as shipped (qconvert.load(OUT); the number ``qconvert eval
OUT`` gives).  ``float``: the same quantized linears (integer weights, per-token integer
activations, dyadic scales) in the float model: norms, attention, softmax, SiLU, RoPE, residual
and the head in float32 (qconvert.load(OUT, integer=False)); integer minus float is what the
integer-only glue costs.  ``weights``: the integer weights alone, activations in float32; float
minus weights is what the activation quantization costs.  Prints one JSON line per mode.
A probe for docs/accuracy.md, not a product path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qconvert import load
from qconvert.evaluate import perplexity
from qconvert.layouts.illm import ILLMLinear


def _weights_only(self: ILLMLinear, x: torch.Tensor) -> torch.Tensor:
    w = self.weights_kn().double() * (self.wm.double() * torch.pow(2.0, -self.wk.double()))[None, :]  # [K, N]
    x2 = x.reshape(-1, x.shape[-1]).double() / self.smooth.double()
    y = (x2 @ w) * self.out_smooth.double()[None, :]
    return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--data-file", required=True)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--modes", default="integer,float,weights")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from qconvert.calibration_text import load_eval_text

    tok = AutoTokenizer.from_pretrained(args.out)
    text = load_eval_text("wikitext2", args.data_file)
    for mode in args.modes.split(","):
        if mode not in ("integer", "float", "weights"):
            raise SystemExit(f"--modes: unknown mode {mode!r} (integer, float, weights)")
        t0 = time.perf_counter()
        model = load(args.out, integer=(mode == "integer"))
        original = ILLMLinear.forward
        if mode == "weights":
            ILLMLinear.forward = _weights_only
        try:
            res = perplexity(model, tok, text, seqlen=args.seqlen, max_windows=args.max_windows, progress=False)
        finally:
            ILLMLinear.forward = original
        print(json.dumps({"out": str(Path(args.out)), "mode": mode, "perplexity": res.perplexity,
                          "windows": res.windows, "seqlen": args.seqlen,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
