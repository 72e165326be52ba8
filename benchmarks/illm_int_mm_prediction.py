"""A prediction, not a measurement: I-LLM's DI-MatMul w8 above the GEMV's rows on torch._int_mm
(cuBLASLt's int8 GEMM) and ``illm_dyadic_rows`` (since 0.4.0), on the Llama-3-8B shapes at M = 4096,
from one GPU check's measurements of cuBLAS FP16, the first DI-MatMul (the 64 x 64 tile kernel) and
the requantization after it.

    python benchmarks/illm_int_mm_prediction.py [RESULTS] [--json F]   (default: the H200 run of caa2c67)

RESULTS holds ``2_rerun/kernels_illm_m4096.json``.  The model: the int8 GEMM takes cuBLAS FP16's
measured time divided by INT8_OVER_FP16 = 1.5 .. 1.9, an ASSUMPTION (the datasheet's dense int8 rate is
twice FP16's on the H100 / H200; cuBLASLt's int8 rate has not been measured here); the epilogue reads
the int32 product and writes int64 t, 12 bytes per output, at the 2.15 TB/s of the W4A8 decode fit;
the requantization (row ``illm-w8a8``) adds what it measured after the first kernel (its time minus
the first kernel's).  QUIK's W8A8 GEMM above 8 rows (since 0.4.0 the same int8 GEMM, then
``quik_epilogue_rows``: 8 bytes per output) likewise, from ``2_rerun/kernels_quik_m4096.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling script, whoever imports this one
from zqfp_repacked_prediction import BYTES_PER_US, DEFAULT, run_cli  # noqa: E402  the H200 run, the W4A8 decode fit, the CLI

INT8_OVER_FP16 = (1.5, 1.9)  # the assumed speed of cuBLASLt's int8 GEMM over cuBLAS FP16 (docstring)


def _predicted(results: Path, m: int, scheme_file: str, kernel: str, epilogue_bytes: int) -> list[tuple[dict, dict]]:
    """(row, its measured rows by kernel) for each shape's ``kernel`` row of ``kernels_<scheme_file>_m<m>.json``,
    the row holding the prediction: cuBLAS FP16 over INT8_OVER_FP16 plus ``epilogue_bytes`` per output."""
    data = json.loads((results / "2_rerun" / f"kernels_{scheme_file}_m{m}.json").read_text())["results"]
    by = {(r["shape"], r["kernel"]): r for r in data}
    out = []
    for (shape, kern), r in sorted(by.items()):
        if kern != kernel:
            continue
        cublas, first, epilogue = by[(shape, "cublas-fp16")]["us"], r["us"], epilogue_bytes * m * r["N"] / BYTES_PER_US
        lo, hi = (cublas / f + epilogue for f in reversed(INT8_OVER_FP16))
        out.append(({"shape": shape, "N": r["N"], "K": r["K"], "M": m, "cublas_us": cublas, "first_us": round(first, 1),
                     "epilogue_us": round(epilogue, 1), "predicted_us": [round(lo, 1), round(hi, 1)],
                     "predicted_vs_cublas": [round(cublas / hi, 2), round(cublas / lo, 2)],
                     "predicted_vs_first": [round(first / hi, 1), round(first / lo, 1)]},
                    {k: v for (sh, k), v in by.items() if sh == shape}))
    return out


def predict(results: Path = DEFAULT, m: int = 4096) -> list[dict]:
    """DI-MatMul w8: 12 bytes per output (int32 read, int64 t written), the requantization as measured."""
    rows = []
    for row, measured in _predicted(results, m, "illm", "illm-matmul-w8", 12):
        requant = measured["illm-w8a8"]["us"] - measured["illm-matmul-w8"]["us"]
        lo, hi = row["predicted_us"]
        rows.append({**row, "requant_us": round(requant, 1), "with_requant_vs_cublas": [
            round(row["cublas_us"] / (hi + requant), 2), round(row["cublas_us"] / (lo + requant), 2)]})
    return rows


def predict_quik(results: Path = DEFAULT, m: int = 4096) -> list[dict]:
    """QUIK's W8A8 GEMM above 8 rows on the same int8 GEMM plus ``quik_epilogue_rows`` (int32 read, the
    outlier product read, fp16 written: 8 bytes per output), against the tile kernel's ``quik-w8a8-gemm``."""
    return [row for row, _ in _predicted(results, m, "quik", "quik-w8a8-gemm", 8)]


def main(argv=None) -> int:
    return run_cli(__doc__, lambda results: [
        ("DI-MatMul w8 on torch._int_mm + illm_dyadic_rows", "rows", predict(results),
         (("+ requant vs cuBLAS", "with_requant_vs_cublas"),)),
        ("QUIK W8A8 GEMM on torch._int_mm + quik_epilogue_rows", "quik_w8a8", predict_quik(results), ())], argv)


if __name__ == "__main__":
    raise SystemExit(main())
