"""benchmarks/gpu_tables.py on the committed H200 results (benchmarks/results/gpu/2026-12-04_h200_8fa9160),
with a made-up mma_peak.json beside them (test input, not a measurement): the W4A8 prefill rows are
given as the fraction of that ceiling, and the tables docs/benchmarks.md quotes still come out."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "results" / "gpu" / "2026-12-04_h200_8fa9160"
spec = importlib.util.spec_from_file_location("gpu_tables", ROOT / "benchmarks" / "gpu_tables.py")
gpu_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_tables)


def _printed(folder, capsys) -> str:
    """What gpu_tables.py prints for ``folder``."""
    gpu_tables.main(str(folder))
    return capsys.readouterr().out


def test_prefill_rows_against_a_measured_ceiling(tmp_path, capsys):
    shutil.copy(RUN / "3_rerun" / "kernels.json", tmp_path / "kernels.json")
    rows = [{"kernel": "imma_peak", "op": "int8 mma.sync m16n8k32 (IMMA)", "warps_per_sm": 16, "blocks": 264, "iters": 4096,
             "ms": 1.0, "tops": 600.0}]
    (tmp_path / "mma_peak.json").write_text(json.dumps({"environment": {"device": "test input"}, "best_tops": {"imma_peak": 600.0},
                                                        "rows": rows}))
    out = _printed(tmp_path, capsys)
    assert "| int8 mma.sync m16n8k32 (IMMA) | 16 | 1.000 | 600.0 |" in out
    assert "int8 mma.sync ceiling measured here (600.0 TOPS)" in out
    # q/o at M = 4096: 296.74 int8 TOPS measured on the H200 = 49% of 600
    assert "| q/o_proj (4096 x 4096) | 4096 | 296.7 | 49% |" in out
    assert "| q/o_proj (4096 x 4096) | 4096 | 203.4 | 463.2 | 501.5 | 0.44x |" in out


def test_without_a_ceiling_the_tables_are_as_before(capsys):
    gpu_tables.main(str(RUN))
    out = capsys.readouterr().out
    assert "mma.sync ceiling" not in out and "9.5 us fixed + 0.501 us per MB" in out


def test_decode_variants_table(tmp_path, capsys):
    rows = [{"shape": "q/o_proj", "N": 4096, "K": 4096, "M": 1, "variant": v, "us": us, "ctas": c, "amax_ctas": a}
            for v, us, c, a in (("before", 12.0, 288, 2), ("one-wave", 10.0, 256, 2), ("own-amax", 11.0, 288, 0), ("now", 8.0, 256, 0))]
    (tmp_path / "decode_variants.json").write_text(json.dumps({"environment": {"device": "test input"}, "rows": rows}))
    gpu_tables.main(str(tmp_path))
    out = capsys.readouterr().out
    assert "| q/o_proj (4096 x 4096) | 1 | 12.00 (288, 2) | 10.00 (256, 2) | 11.00 (288, 0) | 8.00 (256, 0) | 1.50x |" in out

    # the prefetch A/B (the default run since 2026-12-05): two columns, no-prefetch's time over now's
    rows = [{"shape": "down_proj", "N": 4096, "K": 14336, "M": 4, "variant": v, "us": us, "ctas": 256, "amax_ctas": 28}
            for v, us in (("no-prefetch", 21.0), ("now", 14.0))]
    (tmp_path / "decode_variants.json").write_text(json.dumps({"environment": {"device": "test input"}, "rows": rows}))
    gpu_tables.main(str(tmp_path))
    out = capsys.readouterr().out
    assert "| now / no-prefetch |" in out and "| down_proj (4096 x 14336) | 4 | 21.00 (256, 28) | 14.00 (256, 28) | 1.50x |" in out


def test_glue_table(tmp_path, capsys):
    """glue.json (benchmarks/glue_speed.py; made-up figures, test input) as its table."""
    rows = [{"op": "rope", "tokens": 1, "batch": 1, "torch_us": 30.0, "kernel_us": 3.0, "speedup": 10.0, "check": "bit-exact",
             "timing": "cuda-graph"}]
    (tmp_path / "glue.json").write_text(json.dumps({"environment": {"device": "test input"}, "rows": rows}))
    gpu_tables.main(str(tmp_path))
    out = capsys.readouterr().out
    assert "### glue" in out and "| rope | 1 | 30.00 | 3.00 | 10.00x | bit-exact | cuda-graph |" in out


def test_the_caa2c67_run_gives_the_tables_docs_quote(capsys):
    """The second H200 run (benchmarks/results/gpu/2026-12-04_h200_caa2c67): docs/benchmarks.md's rows
    come out of its files as committed."""
    run2 = ROOT / "benchmarks" / "results" / "gpu" / "2026-12-04_h200_caa2c67"
    gpu_tables.main(str(run2 / "1_gpu_check"))
    out = capsys.readouterr().out
    assert "| q/o_proj (4096 x 4096) | 1 | 12.7 | 10.8 | 11.5 | 1.18x | 1.06x | 17% |" in out
    assert "int8 mma.sync ceiling measured here (1,124.7 TOPS)" in out
    assert "| q/o_proj (4096 x 4096) | 1 | 14.64 (288, 2) | 10.01 (256, 2) | 14.98 (288, 0) | 9.61 (256, 0) | 1.52x |" in out
    assert "| cuda-graph | decode batch 1, tokens/s | 145 | 203 | 1.40x |" in out
    gpu_tables.main(str(run2 / "2_rerun"))
    out = capsys.readouterr().out
    assert "| 14336 (28 x 512) | 1 | 47.3 | 1.2 | 38.4x | cuda-graph |" in out
    assert "### kernels:zqfp-w4a8" in out and "### kernels:illm-w8a8" in out and "### kernels:quik-w4a4" in out


def test_the_quik_sm90_rows_come_with_their_prediction(tmp_path, capsys):
    """A QUIK kernel run on the repacked path (int4_path s8r; made-up timings, test input) is printed
    against benchmarks/quik_repacked_prediction.py's rows; the first kernel's runs are not."""
    rows = [{"shape": "q/o_proj", "N": 4096, "K": 4096, "M": 1, "kernel": k, "us": us, "int4_path": "s8r"}
            for k, us in (("cublas-fp16", 12.4), ("quik-w4a4-gemm", 20.2), ("quik-w4a4", 33.15))]
    (tmp_path / "kernels_quik.json").write_text(json.dumps({"kind": "kernels", "scheme": "quik-w4a4",
                                                            "environment": {"device": "test input"}, "results": rows}))
    gpu_tables.main(str(tmp_path))
    out = capsys.readouterr().out
    # predicted at M = 1 for q/o: GEMM 10.1 us, layer 22.1 us (docs/kernels.md)
    assert "| q/o_proj (4096 x 4096) | 1 | 10.1 | 20.2 | 2.00 | - | - | 22.1 | 33.1 | 1.50 |" in out
    # a run with the outlier product in the split's launch: against the decode layer's 14.2 us (split 4.1 us)
    rows.append({**rows[0], "kernel": "quik-split-outliers", "us": 8.2})
    (tmp_path / "kernels_quik.json").write_text(json.dumps({"kind": "kernels", "scheme": "quik-w4a4",
                                                            "environment": {"device": "test input"}, "results": rows}))
    gpu_tables.main(str(tmp_path))
    assert "| q/o_proj (4096 x 4096) | 1 | 10.1 | 20.2 | 2.00 | 4.1 | 8.2 | 14.2 | 33.1 | 2.33 |" in capsys.readouterr().out
    run2 = ROOT / "benchmarks" / "results" / "gpu" / "2026-12-04_h200_caa2c67" / "2_rerun"
    gpu_tables.main(str(run2))
    assert "against its prediction" not in capsys.readouterr().out


def test_the_zqfp_and_illm_rows_come_with_their_predictions(tmp_path, capsys):
    """Runs of the paths predicted before any GPU ran them (made-up timings, test input): fp4-fp8's
    repacked decode, its widened prefill plus the quantizer, fp8-fp8 on torch._scaled_mm plus the
    quantizer, and I-LLM's DI-MatMul on torch._int_mm, each printed against its predicted range; the
    runs of the first kernels (the caa2c67 rerun) are not."""
    zq = [{"shape": "q/o_proj", "N": 4096, "K": 4096, "M": m, "kernel": k, "us": us} for m, k, us in (
        (1, "cublas-fp16", 12.4), (1, "fp4-fp8-decode", 12.0), (1, "quantize-fp8", 2.2), (1, "fp8-fp8-scaled", 20.0),
        (4096, "cublas-fp16", 197.4), (4096, "quantize-fp8", 23.6), (4096, "fp4-fp8-prefill", 100.0))]
    il = [{"shape": "q/o_proj", "N": 4096, "K": 4096, "M": 4096, "kernel": k, "us": us, "matmul": "int_mm"}
          for k, us in (("cublas-fp16", 185.8), ("illm-matmul-w8", 150.0))]
    for name, scheme, rows in (("kernels_zqfp.json", "zqfp-w4a8", zq), ("kernels_illm.json", "illm-w8a8", il)):
        (tmp_path / name).write_text(json.dumps({"kind": "kernels", "scheme": scheme,
                                                 "environment": {"device": "test input"}, "results": rows}))
    out = _printed(tmp_path, capsys)
    # docs/kernels.md's predicted ranges for q/o
    assert "| fp4-fp8-decode | q/o_proj (4096 x 4096) | 1 | 11.5-13.5 | 12.0 | within |" in out
    assert "| fp4-fp8-prefill + quantize-fp8 | q/o_proj (4096 x 4096) | 4096 | 139.2-166.9 | 123.6 | faster |" in out
    assert "| fp8-fp8-scaled + quantize-fp8 | q/o_proj (4096 x 4096) | 1 | 8.4-14.6 | 22.2 | slower |" in out
    assert "| illm-matmul-w8 | q/o_proj (4096 x 4096) | 4096 | 191.4-217.5 | 150.0 | faster |" in out
    assert "made before this ran" not in _printed(ROOT / "benchmarks" / "results" / "gpu" / "2026-12-04_h200_caa2c67" / "2_rerun",
                                                  capsys)


def test_prefill_bm64_table(tmp_path, capsys):
    """The 64-token prefill rows (test input, not a measurement) beside the 128-token ones they came with."""
    data = json.loads((RUN / "3_rerun" / "kernels.json").read_text())
    qo = next(r for r in data["results"] if r["kernel"] == "w4a8-is" and r["M"] == 4096 and r["shape"] == "q/o_proj")
    data["results"].append({**qo, "kernel": "w4a8-is-bm64", "us": qo["us"] / 2, "vs_cublas": 0.88, "same_bits_as_bm128": True})
    (tmp_path / "kernels.json").write_text(json.dumps(data))
    out = _printed(tmp_path, capsys)
    assert "W4A8-IS prefill on 64-token tiles" in out
    assert f"| q/o_proj (4096 x 4096) | 4096 | {qo['us']:.1f} | {qo['us'] / 2:.1f} | 2.00x | 0.88x | yes |" in out
    assert _printed(RUN, capsys).count("64-token tiles") == 0   # runs without the row: no table
