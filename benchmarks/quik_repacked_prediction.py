"""A prediction, not a measurement: QUIK W4A4 on the repacked W4A8 kernels (``w4a8r_decode_quik_m*``
at M <= 64, ``w4a8r_prefill_quik`` above: sm_90's path since 0.4.0) on the Llama-3-8B shapes, from
one GPU check's measurements of the W4A8-IS linears (the same main loops) and of QUIK's first kernel.

    python benchmarks/quik_repacked_prediction.py [RESULTS] [--json F]   (default: the H200 run of caa2c67)

RESULTS holds ``1_gpu_check/kernels.json`` (W4A8-IS, cuBLAS FP16) and ``2_rerun/kernels_quik.json``
(QUIK, 256 outliers).  The model, stated so that the next GPU check can be read against it: the
QUIK GEMM takes the W4A8-IS linear's measured time at the same M (decode at M = 1, prefill at
M = 4096; its per-token quantization included, so an upper bound on the GEMM's share) times Kq / K,
QUIK's base channels being K - 256 rounded up to 128; the whole layer adds what the first design's
layer took beyond its GEMM (the split kernel, cuBLAS's outlier product, the launches).

At M <= 8 the layer now makes its outlier product in the split's launch (``quik_split_wide_*`` with
w_out, since 0.4.0): the "decode layer" column replaces the first design's split and cuBLAS product
by that one launch, modelled as FLOOR_US (the H200's graph-timed cost of a torch copy of a few KB,
docs/benchmarks.md, the Hadamard table) plus ROUND_TRIPS dependent memory round trips of
LATENCY_US each (an assumption: outlier indices, the gathered x, the weights, the stores) plus the
fp16 outlier weights (N x 256 x 2 bytes) read at the W4A8 decode fit's 2.15 TB/s.

The second table is W8A8 at M = 1 (the quik-w4a4 preset's down_proj; every layer of quik-w8a8),
which runs on the GEMV at M <= 8 since 0.4.0 (``quik_gemv_w8a8_*``), modelled as FLOOR_US, two round
trips and its int8 weights (N x Kbp bytes) at 2.15 TB/s; its layer adds the fused split.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "gpu" / "2026-12-04_h200_caa2c67"
OUTLIERS, GROUP = 256, 128
FLOOR_US, ROUND_TRIPS, LATENCY_US, BYTES_PER_US = 1.1, 4, 0.5, 2.15e6  # the fused split's model (docstring)


def fused_split_us(n: int) -> float:
    """The predicted time of the split with the outlier product in its launch, at M <= 8."""
    return FLOOR_US + ROUND_TRIPS * LATENCY_US + n * OUTLIERS * 2 / BYTES_PER_US


def gemv_w8a8_us(n: int, kbp: int) -> float:
    """The predicted time of the W8A8 GEMV at M <= 8 (``quik_gemv_w8a8_*``): the floor, two dependent
    round trips (the first weight chunks, the epilogue's scales), and its int8 weights at 2.15 TB/s."""
    return FLOOR_US + 2 * LATENCY_US + n * kbp / BYTES_PER_US


def predict_w8a8(results: Path) -> list[dict]:
    """The W8A8 layers at M = 1 (the quik-w4a4 preset's down_proj, every layer of quik-w8a8): the
    GEMV against the tile kernel measured, and the layer with the split's fused outlier product."""
    quik = {(r["shape"], r["M"], r["kernel"]): r for r in json.loads((results / "2_rerun" / "kernels_quik.json").read_text())["results"]}
    rows = []
    for (shape, m, kern), r in sorted(quik.items()):
        if kern != "quik-w8a8-gemm" or m != 1:
            continue
        n, k = r["N"], r["K"]
        kbp = math.ceil((k - OUTLIERS) / 64) * 64
        gemv = gemv_w8a8_us(n, kbp)
        rows.append({"shape": shape, "N": n, "K": k, "M": m, "tile_us": r["us"], "gemv_us": round(gemv, 1),
                     "old_layer_us": quik[(shape, m, "quik-w8a8")]["us"], "layer_us": round(gemv + fused_split_us(n), 1),
                     "cublas_us": quik[(shape, m, "cublas-fp16")]["us"]})
    return rows


def predict(results: Path) -> list[dict]:
    w4 = {(r["shape"], r["M"], r["kernel"]): r for r in json.loads((results / "1_gpu_check" / "kernels.json").read_text())["results"]}
    quik = {(r["shape"], r["M"], r["kernel"]): r["us"]
            for r in json.loads((results / "2_rerun" / "kernels_quik.json").read_text())["results"]}
    rows = []
    for shape, m in sorted({(s, m) for s, m, k in quik if k == "quik-w4a4-gemm"}):
        r = w4[(shape, m, "w4a8-is")]
        n, k = r["N"], r["K"]
        kq = math.ceil((k - OUTLIERS) / GROUP) * GROUP
        gemm = r["us"] * kq / k
        old_gemm, old_layer, cublas = (quik[(shape, m, kern)] for kern in ("quik-w4a4-gemm", "quik-w4a4", "cublas-fp16"))
        layer = gemm + old_layer - old_gemm
        row = {"shape": shape, "N": n, "K": k, "M": m, "gemm_us": round(gemm, 1), "old_gemm_us": old_gemm,
               "layer_us": round(layer, 1), "old_layer_us": old_layer, "cublas_us": cublas}
        if m <= 8:
            row["split_outliers_us"] = round(fused_split_us(n), 1)
            row["decode_layer_us"] = round(gemm + fused_split_us(n), 1)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--json", type=Path, help="also write the rows here, labelled a prediction")
    args = ap.parse_args()
    rows = predict(args.results)
    w8 = predict_w8a8(args.results)
    if args.json:
        args.json.write_text(json.dumps({"what": "prediction, not a measurement (see the script's docstring)",
                                         "from": str(args.results), "rows": rows, "w8a8_rows": w8}, indent=1))
    print("| linear (N x K) | M | cuBLAS FP16 us | GEMM: first kernel us | GEMM: predicted us (x cuBLAS) | "
          "layer: first design us | layer: predicted us (x cuBLAS) | decode layer, product in the split: predicted us (x cuBLAS) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["M"], r["shape"])):
        c = r["cublas_us"]
        dec = f"{r['decode_layer_us']:.1f} ({c / r['decode_layer_us']:.2f}x)" if "decode_layer_us" in r else "-"
        print(f"| {r['shape']} ({r['N']} x {r['K']}) | {r['M']} | {c:.1f} | {r['old_gemm_us']:.1f} | "
              f"{r['gemm_us']:.1f} ({c / r['gemm_us']:.2f}x) | {r['old_layer_us']:.1f} | {r['layer_us']:.1f} ({c / r['layer_us']:.2f}x) | {dec} |")
    print()
    print("| W8A8 linear (N x K) | M | cuBLAS FP16 us | GEMM: tile kernel us | GEMM: GEMV predicted us (x cuBLAS) | "
          "layer: first design us | layer: predicted us (x cuBLAS) |")
    print("|---|---|---|---|---|---|---|")
    for r in w8:
        c = r["cublas_us"]
        print(f"| {r['shape']} ({r['N']} x {r['K']}) | {r['M']} | {c:.1f} | {r['tile_us']:.1f} | {r['gemv_us']:.1f} "
              f"({c / r['gemv_us']:.2f}x) | {r['old_layer_us']:.1f} | {r['layer_us']:.1f} ({c / r['layer_us']:.2f}x) |")


if __name__ == "__main__":
    main()
