"""A prediction, not a measurement: ZeroQuant-FP fp4-fp8 on its repacked weights (since 0.4.0) on the
Llama-3-8B shapes, at M = 1 the repacked decode kernel (``w4a8r_decode_zq_m*``, fp8/fp8_repacked.cu)
and at M = 4096 the widening (``w4a8r_widen_zq``) plus torch._scaled_mm's FP8 GEMM, from one GPU
check's measurements of the W4A8-FS decode kernel (the same kernel, instantiated for int8), cuBLAS
FP16, the E4M3 quantizer and fp4-fp8's first kernel (the 64 x 64 tile GEMM plus its quantizer).

    python benchmarks/zqfp_repacked_prediction.py [RESULTS] [--json F]   (default: the H200 run of caa2c67)

RESULTS holds ``1_gpu_check/kernels_m1.json`` (W4A8-FS, cuBLAS FP16) and ``2_rerun/kernels_zqfp_m1.json``
(fp4-fp8).  The model, stated so that the next GPU check can be read against it: the decode kernel
reads the same weight bytes as W4A8-FS (half a byte per weight; int8 group exponents instead of fp16
scales, fewer bytes) through the same pipeline and split-K plan, so its time is at least the W4A8-FS
decode's measured time; its main loop has more integer instructions (the E2M1 -> E4M3 widening, and
on sm_90 ptxas's E4M3 -> fp16 widening in front of two HMMA per FP8 mma): 708 SASS instructions in
the sm_90 m8 loop against W4A8-FS's 602 in the launchers' NVRTC builds (`python benchmarks/sass_loops.py
--archs sm_90 --kernels w4a8r_decode_fs_m8,w4a8r_decode_zq_m8`), so the upper end is that time x
708 / 602, as if the loop were issue-bound.  The first kernel's time is its GEMM plus its quantizer launch.

Prefill (M = 4096): the quantizer's measured time, plus the widening (it reads the FP4 copy and
writes E4M3: 1.5 bytes per weight, at the 2.15 TB/s of the W4A8 decode fit), plus cuBLAS FP16's
measured time divided by FP8_OVER_FP16 = 1.5 .. 1.9, an ASSUMPTION (the datasheet's dense FP8 rate is
twice FP16's on the H100 / H200; the row-wise FP8 GEMM's own rate has not been measured here).

fp8-fp8 (since 0.4.0 every M on torch._scaled_mm with per-row scales): the quantizer's measured time
plus the GEMM's, which at M = 1 reads one byte per weight where cuBLAS FP16 reads two, so it is put
between half cuBLAS FP16's measured time (the same bandwidth) and all of it (an ASSUMPTION: no gain
from the halved bytes); at M = 4096 cuBLAS FP16's time over FP8_OVER_FP16 as above.  Against the first
kernel's GEMM plus its quantizer (``kernels_zqfp_m*.json``, row ``fp8-fp8``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "gpu" / "2026-12-04_h200_caa2c67"
LOOP_ZQ, LOOP_FS = 708, 602  # SASS instructions of the sm_90 m8 decode loops, NVRTC (docstring)
FP8_OVER_FP16 = (1.5, 1.9)   # the assumed speed of the row-wise FP8 GEMM over cuBLAS FP16 (docstring)
BYTES_PER_US = 2.15e6        # the W4A8 decode fit's bandwidth, bytes per µs


def predict_prefill(results: Path) -> list[dict]:
    """M = 4096: quantizer + widening + the FP8 GEMM, against cuBLAS FP16 and the first kernel."""
    zq = {(r["shape"], r["kernel"]): r for r in json.loads((results / "2_rerun" / "kernels_zqfp_m4096.json").read_text())["results"]}
    rows = []
    for (shape, kern), r in sorted(zq.items()):
        if kern != "fp4-fp8":
            continue
        n, k = r["N"], r["K"]
        cublas, quant = zq[(shape, "cublas-fp16")]["us"], zq[(shape, "quantize-fp8")]["us"]
        widen = 1.5 * n * k / BYTES_PER_US
        lo, hi = (quant + widen + cublas / f for f in reversed(FP8_OVER_FP16))
        first = r["us"] + quant
        rows.append({"shape": shape, "N": n, "K": k, "M": 4096, "cublas_us": cublas, "first_us": round(first, 1),
                     "widen_us": round(widen, 1), "predicted_us": [round(lo, 1), round(hi, 1)],
                     "predicted_vs_cublas": [round(cublas / hi, 2), round(cublas / lo, 2)],
                     "predicted_vs_first": [round(first / hi, 1), round(first / lo, 1)]})
    return rows


def predict_fp8_fp8(results: Path) -> list[dict]:
    """fp8-fp8 at M = 1 and 4096: quantizer + torch._scaled_mm, against cuBLAS FP16 and the first kernel."""
    rows = []
    for m in (1, 4096):
        zq = {(r["shape"], r["kernel"]): r for r in
              json.loads((results / "2_rerun" / f"kernels_zqfp_m{m}.json").read_text())["results"]}
        for (shape, kern), r in sorted(zq.items()):
            if kern != "fp8-fp8":
                continue
            cublas, quant = zq[(shape, "cublas-fp16")]["us"], zq[(shape, "quantize-fp8")]["us"]
            gemm = (cublas / 2, cublas) if m == 1 else tuple(cublas / f for f in reversed(FP8_OVER_FP16))
            lo, hi = (quant + g for g in gemm)
            first = r["us"] + quant
            rows.append({"shape": shape, "N": r["N"], "K": r["K"], "M": m, "cublas_us": cublas, "first_us": round(first, 1),
                         "predicted_us": [round(lo, 1), round(hi, 1)],
                         "predicted_vs_cublas": [round(cublas / hi, 2), round(cublas / lo, 2)],
                         "predicted_vs_first": [round(first / hi, 1), round(first / lo, 1)]})
    return rows


def _print(rows: list[dict], extra: tuple = ()) -> None:
    """The rows as a table; ``extra``: (header, key) of further ranges printed as "lo-hix"."""
    head = "".join(f"{h:>{len(h) + 3}}" for h, _ in extra)
    print(f"{'shape':<14}{'N':>7}{'K':>7}{'M':>6}{'cuBLAS us':>11}{'first us':>10}{'predicted us':>16}{'vs cuBLAS':>12}{'vs first':>11}"
          + head)
    for r in rows:
        lo, hi = r["predicted_us"]
        more = "".join(f"{'{}-{}x'.format(*r[key]):>{len(h) + 3}}" for h, key in extra)
        print(f"{r['shape']:<14}{r['N']:>7}{r['K']:>7}{r['M']:>6}{r['cublas_us']:>11.1f}{r['first_us']:>10.1f}{f'{lo}-{hi}':>16}"
              f"{'{}-{}x'.format(*r['predicted_vs_cublas']):>12}{'{}-{}x'.format(*r['predicted_vs_first']):>11}" + more)


def run_cli(doc: str, sections, argv=None) -> int:
    """A prediction script's command line: RESULTS (default DEFAULT) and --json F; ``sections(results)``
    gives [(title, JSON key, rows, extra columns)], each printed as a table labelled a prediction."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("results", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    out = {"kind": "prediction", "source": str(a.results)}
    for i, (title, key, rows, extra) in enumerate(sections(a.results)):
        print(("\n" if i else "") + f"PREDICTION (not measured): {title}, from {a.results.name}")
        _print(rows, extra)
        out[key] = rows
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


def predict(results: Path) -> list[dict]:
    w4 = {(r["shape"], r["kernel"]): r for r in json.loads((results / "1_gpu_check" / "kernels_m1.json").read_text())["results"]}
    zq = {(r["shape"], r["kernel"]): r for r in json.loads((results / "2_rerun" / "kernels_zqfp_m1.json").read_text())["results"]}
    rows = []
    for (shape, kern), r in sorted(zq.items()):
        if kern != "fp4-fp8" or (shape, "w4a8-fs") not in w4:
            continue
        fs, cublas = w4[(shape, "w4a8-fs")]["us"], zq[(shape, "cublas-fp16")]["us"]
        first = r["us"] + zq[(shape, "quantize-fp8")]["us"]
        lo, hi = fs, fs * LOOP_ZQ / LOOP_FS
        rows.append({"shape": shape, "N": r["N"], "K": r["K"], "M": 1, "cublas_us": cublas, "first_us": round(first, 1),
                     "predicted_us": [round(lo, 1), round(hi, 1)],
                     "predicted_vs_cublas": [round(cublas / hi, 2), round(cublas / lo, 2)],
                     "predicted_vs_first": [round(first / hi, 1), round(first / lo, 1)]})
    return rows


def main(argv=None) -> int:
    def sections(results):
        return [("fp4-fp8 on its repacked weights, decode", "rows", predict(results), ()),
                ("fp4-fp8 on its repacked weights, prefill", "prefill", predict_prefill(results), ()),
                ("fp8-fp8 on torch._scaled_mm", "fp8_fp8", predict_fp8_fp8(results), ())]

    return run_cli(__doc__, sections, argv)


if __name__ == "__main__":
    raise SystemExit(main())
