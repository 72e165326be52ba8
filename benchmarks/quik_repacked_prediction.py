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
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "gpu" / "2026-12-04_h200_caa2c67"
OUTLIERS, GROUP = 256, 128


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
        rows.append({"shape": shape, "N": n, "K": k, "M": m, "gemm_us": round(gemm, 1), "old_gemm_us": old_gemm,
                     "layer_us": round(layer, 1), "old_layer_us": old_layer, "cublas_us": cublas})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--json", type=Path, help="also write the rows here, labelled a prediction")
    args = ap.parse_args()
    rows = predict(args.results)
    if args.json:
        args.json.write_text(json.dumps({"what": "prediction, not a measurement (see the script's docstring)",
                                         "from": str(args.results), "rows": rows}, indent=1))
    print("| linear (N x K) | M | cuBLAS FP16 us | GEMM: first kernel us | GEMM: predicted us (x cuBLAS) | "
          "layer: first design us | layer: predicted us (x cuBLAS) |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["M"], r["shape"])):
        c = r["cublas_us"]
        print(f"| {r['shape']} ({r['N']} x {r['K']}) | {r['M']} | {c:.1f} | {r['old_gemm_us']:.1f} | "
              f"{r['gemm_us']:.1f} ({c / r['gemm_us']:.2f}x) | {r['old_layer_us']:.1f} | {r['layer_us']:.1f} ({c / r['layer_us']:.2f}x) |")


if __name__ == "__main__":
    main()
