"""What storing a GGUF source's unquantized tensors in float16 (``quantize --float-dtype auto``) costs
in accuracy, against the float32 transformers dequantizes the file to.  Two measures, mean NLL on
windows of 512 tokens of WikiText-2 test, float32 arithmetic throughout:

1. the float source: its embedding rounded to float16 (and to bfloat16, for scale), its norm
   weights rounded to float16, each against the source as read (8 windows);
2. a quantized OUT made with ``--float-dtype float32``: its embedding rounded to float16, against
   three draws of random relative noise of 2^-12 in the embedding, the spread any such change
   makes through the int8 activations' rounding (20 windows).

Prints a table and writes JSON.

    qconvert quantize smollm2-135m --scheme is-w4a8-rtn --float-dtype float32 -o OUT32
    python benchmarks/gguf_float16_cost.py OUT32 [--source smollm2-135m] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qconvert import load
from qconvert.source import resolve_source

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
SEQLEN = 512


def mean_nll(model, ids: torch.Tensor, windows: int) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(windows):
            x = ids[i * SEQLEN:(i + 1) * SEQLEN][None]
            total += model(x, labels=x).loss.item()
    return total / windows


def source_rows(src, ids) -> list[dict]:
    model = src.load_model(torch.float32).eval()
    base = mean_nll(model, ids, 8)
    emb = model.get_input_embeddings().weight
    orig = emb.data.clone()
    rows = []
    for dt in (torch.float16, torch.bfloat16):
        emb.data.copy_(orig.to(dt).float())
        rows.append({"model": "float source", "change": f"embedding in {str(dt)[6:]}", "windows": 8,
                     "delta_nll": mean_nll(model, ids, 8) - base})
    emb.data.copy_(orig)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.copy_(p.data.half().float())
    rows.append({"model": "float source", "change": "norms in float16", "windows": 8,
                 "delta_nll": mean_nll(model, ids, 8) - base})
    return rows


def out_rows(out: Path, ids) -> list[dict]:
    model = load(out, dtype=torch.float32)
    emb = model.get_input_embeddings().weight
    orig = emb.data.clone()
    base = mean_nll(model, ids, 20)
    emb.data.copy_(orig.half().float())
    rows = [{"model": out.name, "change": "embedding in float16", "windows": 20, "delta_nll": mean_nll(model, ids, 20) - base}]
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        emb.data.copy_(orig * (1 + 2.0**-12 * torch.randn(orig.shape, generator=g)))
        rows.append({"model": out.name, "change": f"random 2^-12 noise, seed {seed}", "windows": 20,
                     "delta_nll": mean_nll(model, ids, 20) - base})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="an OUT of the source made with --float-dtype float32")
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    src = resolve_source(args.source)
    tok = src.load_tokenizer()
    text = WIKI.read_text(encoding="utf-8")
    rows = source_rows(src, tok(text[:200000], return_tensors="pt").input_ids[0])
    rows += out_rows(args.out, tok(text[:400000], return_tensors="pt").input_ids[0])
    print(f"{'model':<16} {'change':<30} {'windows':>7} {'delta mean NLL':>15}")
    for r in rows:
        print(f"{r['model']:<16} {r['change']:<30} {r['windows']:>7} {r['delta_nll']:>+15.2e}")
    if args.json is not None:
        args.json.write_text(json.dumps({"source": args.source, "seqlen": SEQLEN, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
