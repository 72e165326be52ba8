"""A prediction, not a measurement: QUIK W4A4's GEMM on the repacked W4A8 prefill kernel
(``w4a8r_prefill_quik``, sm_90's path since 0.4.0) on the Llama-3-8B shapes, from one GPU check's
measurements of the W4A8-IS linears (the same main loop) and of QUIK's first kernel.

    python benchmarks/quik_repacked_prediction.py [RESULTS]   (default: the H200 run of caa2c67)

RESULTS holds ``1_gpu_check/kernels.json`` (W4A8-IS, cuBLAS FP16) and ``2_rerun/kernels_quik.json``
(QUIK, 256 outliers).  The model, stated so it can be checked against the next GPU check:
- M = 4096: the W4A8-IS linear's time (its quantizer included: an upper bound on the GEMM) times
  Kq / K, QUIK's base channels being K - 256 rounded up to 128;
- M = 1: that time per wave of full-K tiles (``ceil(32 x tiles / SMs)`` waves at M = 4096), times the
  waves of the M = 1 plan (``w4a8.cuda.prefill_plan``: split-K S ways when the tiles do not fill the
  SMs), divided by S; the kernel computes all 128 token rows of a tile whatever M is, so a tile
  costs what it costs at M = 4096.  The split-K reduction and the launch are left out.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "gpu" / "2026-12-04_h200_caa2c67"
OUTLIERS, GROUP, TILE = 256, 128, 128


def predict(results: Path, sms: int) -> list[dict]:
    w4 = {(r["shape"], r["M"], r["kernel"]): r for r in json.loads((results / "1_gpu_check" / "kernels.json").read_text())["results"]}
    quik = {(r["shape"], r["M"], r["kernel"]): r["us"]
            for r in json.loads((results / "2_rerun" / "kernels_quik.json").read_text())["results"]}
    rows = []
    for shape in sorted({s for s, m, k in quik if k == "quik-w4a4-gemm"}):
        r = w4[(shape, 4096, "w4a8-is")]
        n, k = r["N"], r["K"]
        kq = math.ceil((k - OUTLIERS) / GROUP) * GROUP
        tiles = math.ceil(n / TILE)
        t4096 = r["us"] * kq / k
        per_wave = t4096 / math.ceil(32 * tiles / sms)
        splits = 1 if tiles >= sms else max(1, min(4, kq // GROUP, sms // tiles))
        t1 = math.ceil(tiles * splits / sms) * per_wave / splits
        for m, pred in ((1, t1), (4096, t4096)):
            old, cublas = quik[(shape, m, "quik-w4a4-gemm")], quik[(shape, m, "cublas-fp16")]
            rows.append({"shape": shape, "N": n, "K": k, "M": m, "predicted_us": round(pred, 1), "old_us": old,
                         "cublas_us": cublas, "vs_old": round(old / pred, 2), "vs_cublas": round(cublas / pred, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--sms", type=int, default=132, help="SMs of the device the results came from (H200: 132)")
    args = ap.parse_args()
    print("| linear (N x K) | M | predicted us | first kernel us (measured) | first / predicted | cuBLAS FP16 us (measured) | x cuBLAS (predicted) |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(predict(args.results, args.sms), key=lambda r: (r["M"], r["shape"])):
        print(f"| {r['shape']} ({r['N']} x {r['K']}) | {r['M']} | {r['predicted_us']} | {r['old_us']:.1f} | "
              f"{r['vs_old']:.2f}x | {r['cublas_us']:.1f} | {r['vs_cublas']:.2f}x |")


if __name__ == "__main__":
    main()
