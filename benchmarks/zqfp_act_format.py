"""FP8 (E4M3) against INT8 per-token activations at the same FP8 weights: WikiText-2 perplexity.

    python benchmarks/zqfp_act_format.py OUT --data-file wiki.test.raw [--seqlen 512] [--max-windows 40]
                                         [--acts fp8,int8,none]

OUT is a ``zqfp-w8a8`` output (layout fp8-fp8: E4M3 per-channel weights).  ``fp8`` evaluates it
as shipped (qconvert.load: the runtime's per-token E4M3 activations; the same number as
``qconvert eval OUT``); ``int8`` swaps every layer's activation quantizer for the per-token int8
one of the integer schemes (qconvert_kernels.w4a8.reference.quantize_per_token_int8, qmax 127), the
FP8 weights and the exact sums unchanged; ``none`` keeps the activations in float32 (FP8
weights alone).  Prints one JSON line per mode.  A probe for docs/accuracy.md, not a product path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qconvert.evaluate import perplexity
from qconvert.layouts.fp8 import FP8Linear
from qconvert_kernels.w4a8 import reference as ref


def _forward_with(acts: str):
    def forward(self: FP8Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        w = self.qweight.double()[:, : self.in_features] * self.wscale.double()[:, None]
        if acts == "int8":
            xq, t = ref.quantize_per_token_int8(x2)
            y = (xq.double() @ self.qweight.double()[:, : self.in_features].t()).float() * (t[:, None] * self.wscale[None])
            if self.lorc_rank:
                y = y + ((xq.float() * t[:, None]) @ self.lorc_v.float().t()) @ self.lorc_u.float().t()
        else:  # "none": float activations, the dequantized FP8 weights (+ LoRC)
            y = x2 @ w.float().t()
            if self.lorc_rank:
                y = y + (x2 @ self.lorc_v.float().t()) @ self.lorc_u.float().t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    return forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--data-file", type=Path, required=True)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--acts", default="fp8,int8")
    args = ap.parse_args()
    from qconvert.calibration_text import load_eval_text
    from qconvert.evaluate import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(str(args.out))  # exactly what `qconvert eval OUT` loads
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if not layers or any(m.layout != "fp8-fp8" for m in layers):
        raise SystemExit(f"{args.out}: expected a zqfp-w8a8 output (layout fp8-fp8 throughout)")
    text = load_eval_text("wikitext2", args.data_file)
    original = FP8Linear.forward
    for acts in args.acts.split(","):
        FP8Linear.forward = original if acts == "fp8" else _forward_with(acts)
        try:
            res = perplexity(model, tok, text, args.seqlen, args.max_windows, progress=False)
        finally:
            FP8Linear.forward = original
        print(json.dumps({"out": str(args.out), "activations": acts, **res.to_dict()}), flush=True)


if __name__ == "__main__":
    main()
