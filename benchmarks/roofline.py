"""Roofline of the W4A8 kernels on Llama-3-8B shapes, and the design's PREDICTED times (not
measurements): bytes, ops, HBM / tensor-core ceilings of H200 and H100 SXM, the predicted time of
the repacked W4A8-IS / W4A8-FS kernels and of cuBLAS FP16, the predicted speed-ups and the share
of the W4A8 roofline the design is predicted to reach.  The model and every assumption in it are
in qconvert_kernels/roofline.py and docs/kernels.md; `qconvert bench --kernels` measures.

    python benchmarks/roofline.py                                  # table on stdout, JSON to
    python benchmarks/roofline.py --json benchmarks/results/roofline.json --devices H200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qconvert_kernels import roofline  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", nargs="+", default=["H200", "H100"], choices=sorted(roofline.DEVICES))
    ap.add_argument("--m", nargs="+", type=int, default=list(roofline.MS), help="token counts M")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "roofline.json")
    args = ap.parse_args(argv)
    rows = roofline.table(devices=args.devices, ms=args.m, g=args.group_size)
    print("PREDICTIONS from a model (qconvert_kernels/roofline.py), not measurements.")
    print(roofline.format_table(rows))
    block = roofline.block_table(rows)
    print("\nOne Llama-3-8B decoder block's seven linears (PREDICTED): one W4A8-IS GEMM each, q/k/v and gate/up "
          "joined (qconvert.runtime.fuse_siblings), cuBLAS FP16 one each")
    print(roofline.format_block_table(block))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"kind": "roofline-prediction", "group_size": args.group_size,
                                     "assumptions": roofline.assumptions(), "rows": rows, "block": block}, indent=2) + "\n")
    print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
