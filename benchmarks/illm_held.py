"""The bytes an I-LLM OUT's integer-only model holds, on the torch integer path and with the I-LLM
kernels turned on (what ``load(OUT, device="cuda")`` runs), counted on this device: every distinct
storage behind the model's parameters, buffers and joined sibling weights (a view counted once,
with its whole storage).  The tensors are the same on a GPU; only where they live differs.

With the kernels on, each linear the DI-MatMul kernel takes drops the torch path's int8 [K, N]
copy of its weights (the kernel reads ``qweight``), and q/k/v and gate/up hold their weights once,
joined (with joined int32 copies of their small mantissa and exponent vectors).  Prints a table and
writes JSON.

    python benchmarks/illm_held.py OUT [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qconvert import load
from qconvert.bench import environment

ROOT = Path(__file__).resolve().parents[1]


def held_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's tensors and its joined linears."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    for joined in getattr(model, "_joined", {}).values():
        tensors += [joined.qweight, joined.wm, joined.wk, joined.kmin]
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[(t.device, st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "illm_held.json")
    args = ap.parse_args()
    model = load(args.out)
    lins = model.decoder_linears()
    weights = sum(lin.out_features * lin.in_features for lin in lins)
    torch_path = held_bytes(model)
    model.use_kernels(True)
    kernels = held_bytes(model)
    released = sum(lin.kernel for lin in lins)
    print(f"{args.out}: {len(lins)} linears ({released} on the DI-MatMul kernel), {weights / 1e6:.1f} M weights")
    print(f"{'form':<28}{'held MB':>10}")
    print(f"{'torch integer path':<28}{torch_path / 1e6:>10.1f}")
    print(f"{'kernels on':<28}{kernels / 1e6:>10.1f}")
    print(f"less with the kernels on: {(torch_path - kernels) / 1e6:.1f} MB (the torch path's int8 [K, N] copies "
          "released, the joins' vectors added)")
    result = {"out": str(args.out), "linears": len(lins), "on_kernel": released, "linear_weights": weights,
              "held_bytes": {"torch_path": torch_path, "kernels": kernels}, "environment": environment(torch.device("cpu"))}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
