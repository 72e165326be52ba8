"""Markdown tables of a GPU run's JSON results (gpu_check.sh's, or files named like them), for
docs/benchmarks.md: the W4A8 kernels against cuBLAS FP16 beside the roofline model's predictions,
QUIK's kernels, the online Hadamard transform, the float glue's kernels, and the end-to-end runs.

    python benchmarks/gpu_tables.py benchmarks/results/gpu/2026-12-04_h200_8fa9160
    python benchmarks/gpu_tables.py --merge OUT/kernels.json [--plot OUT/kernels.png] OUT/kernels_m*.json

``--merge``: the kernel benches of one scheme run one M per process (gpu_check.sh, part b) made
into one result, with its summary (and plot), as one ``qconvert bench --kernels`` would write it.

Every *.json under the folder is read (kernels*.json with kind "kernels" and a scheme, e2e*.json,
hadamard.json, glue.json, mma_peak.json, decode_variants.json, roofline.json); a kind with no file gets no
table.  With an mma_peak.json, the W4A8 prefill rows are also given as a fraction of that measured
int8 mma.sync ceiling."""

from __future__ import annotations

import json
from pathlib import Path


def _load(folder: Path) -> dict[str, list]:
    found: dict[str, list] = {}
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a result file
        if not isinstance(data, dict):
            continue
        if path.name == "hadamard.json":
            key = "hadamard"
        elif path.name == "glue.json":
            key = "glue"
        elif path.name == "mma_peak.json":
            key = "mma_peak"
        elif path.name == "decode_variants.json":
            key = "decode_variants"
        elif path.name == "roofline.json":
            key = "roofline"
        elif data.get("kind") == "model":
            key = "e2e"
        elif data.get("kind") == "kernels":
            key = f"kernels:{data.get('scheme') or 'is-w4a8'}"
        else:
            continue
        found.setdefault(key, []).append((path, data))
    return found


def _env(data: dict) -> str:
    e = data.get("environment") or data
    return f"{e.get('device')}, torch {e.get('torch')}, commit {e.get('commit')}, {e.get('date')}"


def mma_peak_table(data: dict) -> list[str]:
    out = ["| tensor-core product | warps per SM | ms | TOPS |", "|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['op']} | {r['warps_per_sm']} | {r['ms']:.3f} | {r['tops']:,.1f} |")
    return out


def decode_variants_table(data: dict) -> list[str]:
    """W4A8-IS decode under the variants of benchmarks/decode_variants.py that the run timed (the four
    plans of 2026-12-04, or no-prefetch, stages-16 and now), µs, and the first variant's time over now's."""
    rows = {}
    for r in data["rows"]:
        rows.setdefault((r["M"], r["shape"], r["N"], r["K"]), {})[r["variant"]] = r
    seen = {r["variant"] for r in data["rows"]}
    names = [v for v in ("before", "one-wave", "own-amax", "no-prefetch", "stages-16", "now") if v in seen]
    if "now" not in names or len(names) < 2:
        return []
    out = ["| linear (N x K) | M | " + " | ".join(f"{v} us (CTAs, A)" for v in names) + f" | now / {names[0]} |",
           "|---|---|" + "---|" * len(names) + "---|"]
    for (m, shape, n, k), by in sorted(rows.items()):
        if not all(v in by for v in names):
            continue
        cells = [f"{by[v]['us']:.2f} ({by[v]['ctas']}, {by[v]['amax_ctas']})" for v in names]
        out.append(f"| {shape} ({n} x {k}) | {m} | " + " | ".join(cells) + f" | {by[names[0]]['us'] / by['now']['us']:.2f}x |")
    return out


def prefill_of_ceiling(runs: list, mma: dict | None) -> list[str]:
    """W4A8-IS and FS at M >= 256 as a fraction of the measured int8 mma.sync ceiling (mma_peak.json)."""
    best = (mma or {}).get("best_tops", {}).get("imma_peak")
    if not best:
        return []
    out = [f"\nW4A8 at M >= 256 against the int8 mma.sync ceiling measured here ({best:,.1f} TOPS):",
           "\n| linear (N x K) | M | W4A8-IS TOPS | of the ceiling | W4A8-FS TOPS | of the ceiling |", "|---|---|---|---|---|---|"]
    rows = {}
    for _, data in runs:
        for r in data["results"]:
            if r["M"] >= 256 and r.get("tops"):
                rows.setdefault((r["M"], r["shape"], r["N"], r["K"]), {})[r["kernel"]] = r["tops"]
    for (m, shape, n, k), by in sorted(rows.items()):
        i, f = by.get("w4a8-is"), by.get("w4a8-fs")
        if i and f:
            out.append(f"| {shape} ({n} x {k}) | {m} | {i:,.1f} | {100 * i / best:.0f}% | {f:,.1f} | {100 * f / best:.0f}% |")
    return out


def _by_linear(runs: list) -> dict:
    """{(shape, N, K, M): {kernel: row}} over the runs' kernel results."""
    rows = {}
    for _, data in runs:
        for r in data["results"]:
            rows.setdefault((r["shape"], r["N"], r["K"], r["M"]), {})[r["kernel"]] = r
    return rows


def prefill_bm64_table(runs: list) -> list[str]:
    """W4A8-IS prefill on 64-token tiles (two CTAs per SM) against the 128-token ones the layers run."""
    out = []
    for (shape, n, k, m), by in sorted(_by_linear(runs).items(), key=lambda kv: (kv[0][3], kv[0][0])):
        i, b = by.get("w4a8-is"), by.get("w4a8-is-bm64")
        if i and b:
            out.append(f"| {shape} ({n} x {k}) | {m} | {i['us']:.1f} | {b['us']:.1f} | {i['us'] / b['us']:.2f}x | "
                       f"{b['vs_cublas']:.2f}x | {'yes' if b.get('same_bits_as_bm128') else 'NO'} |")
    head = ["\nW4A8-IS prefill on 64-token tiles (w4a8r_prefill_is_bm64) against the 128-token ones:",
            "\n| linear (N x K) | M | 128-token us | 64-token us | 128 / 64 | 64-token / cuBLAS | same bits |",
            "|---|---|---|---|---|---|---|"]
    return head + out if out else []


def w4a8_table(runs: list, roofline: dict | None) -> list[str]:
    pred = {}
    for r in (roofline or {}).get("rows", []):
        if r["device"] == "H200":
            pred[(r["N"], r["K"], r["M"])] = r
    rows = _by_linear(runs)
    out = ["| linear (N x K) | M | cuBLAS FP16 us | W4A8-IS us | W4A8-FS us | IS / cuBLAS | IS / FS | IS roofline | "
           "predicted IS us | predicted IS / cuBLAS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (shape, n, k, m), by in sorted(rows.items(), key=lambda kv: (kv[0][3], kv[0][0])):
        c, i, f = by.get("cublas-fp16"), by.get("w4a8-is"), by.get("w4a8-fs")
        if not (c and i and f):
            continue
        p = pred.get((n, k, m)) or {}
        out.append(f"| {shape} ({n} x {k}) | {m} | {c['us']:.1f} | {i['us']:.1f} | {f['us']:.1f} | {i['vs_cublas']:.2f}x | "
                   f"{i['is_vs_fs']:.2f}x | {100 * i['roofline_frac']:.0f}% | "
                   + (f"{p['pred_is_us']:.1f} | {p['pred_is_vs_cublas']:.2f}x |" if p else "- | - |"))
    # time = fixed + bytes / rate, least squares over the M = 1 W4A8-IS rows (bytes = GB/s x time)
    pts = [(by["w4a8-is"]["gbps"] * by["w4a8-is"]["us"] * 1e-3, by["w4a8-is"]["us"])
           for (_, _, _, m), by in rows.items() if m == 1 and "w4a8-is" in by]
    if len(pts) >= 2:
        mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        out.append(f"\nW4A8-IS at M = 1, least squares over {len(pts)} rows: {my - slope * mx:.1f} us fixed + "
                   f"{slope:.3f} us per MB ({1 / slope:.2f} TB/s)")
    return out


def quik_table(runs: list) -> list[str]:
    rows = {}
    for _, data in runs:
        for r in data["results"]:
            rows.setdefault((r["shape"], r["N"], r["K"], r["M"]), {})[r["kernel"]] = r
    kernels = sorted({k for by in rows.values() for k in by if k != "cublas-fp16"})
    out = ["| linear (N x K) | M | cuBLAS FP16 us | " + " | ".join(f"{k} us (x cuBLAS)" for k in kernels) + " |",
           "|---|---|---|" + "---|" * len(kernels)]
    for (shape, n, k, m), by in sorted(rows.items(), key=lambda kv: (kv[0][3], kv[0][0])):
        c = by.get("cublas-fp16")
        if not c:
            continue
        cells = [f"{by[q]['us']:.1f} ({c['us'] / by[q]['us']:.2f}x)" if q in by else "-" for q in kernels]
        out.append(f"| {shape} ({n} x {k}) | {m} | {c['us']:.1f} | " + " | ".join(cells) + " |")
    return out


def quik_against_prediction(runs: list) -> list[str]:
    """The sm_90 path's rows (``int4_path`` "s8r", since 0.4.0) against the prediction made before any
    GPU ran it (benchmarks/quik_repacked_prediction.py, from the H200 rows of caa2c67); nothing for
    runs of the first kernel."""
    import importlib.util

    rows = {(r["shape"], r["M"], r["kernel"]): r for _, data in runs for r in data["results"]}
    if not any(r.get("int4_path") == "s8r" for r in rows.values()):
        return []
    spec = importlib.util.spec_from_file_location("quik_repacked_prediction",
                                                  Path(__file__).with_name("quik_repacked_prediction.py"))
    pred = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pred)
    out = ["", "The sm_90 path against its prediction (benchmarks/quik_repacked_prediction.py; where the run has "
           "quik-split-outliers, the layer's prediction is the decode layer's, the outlier product made in the split's "
           "launch):", "",
           "| linear (N x K) | M | GEMM predicted us | GEMM measured us | measured / predicted | split + outliers predicted us | "
           "measured us | layer predicted us | layer measured us | measured / predicted |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(pred.predict(pred.DEFAULT), key=lambda p: (p["M"], p["shape"])):
        g, layer = rows.get((p["shape"], p["M"], "quik-w4a4-gemm")), rows.get((p["shape"], p["M"], "quik-w4a4"))
        if g is None or layer is None:
            continue
        fused = rows.get((p["shape"], p["M"], "quik-split-outliers"))
        want = p["decode_layer_us"] if fused and "decode_layer_us" in p else p["layer_us"]
        split = f"{p['split_outliers_us']:.1f} | {fused['us']:.1f}" if fused and "split_outliers_us" in p else "- | -"
        out.append(f"| {p['shape']} ({p['N']} x {p['K']}) | {p['M']} | {p['gemm_us']:.1f} | {g['us']:.1f} | "
                   f"{g['us'] / p['gemm_us']:.2f} | {split} | {want:.1f} | {layer['us']:.1f} | {layer['us'] / want:.2f} |")
    return out


# kernels:<scheme> -> the prediction script (benchmarks/), and per function of it: the measured row its
# rows are read against, the rows measured apart that its prediction includes (the quantizer), and what
# a row must record to be of the predicted path (the I-LLM rows of the tile kernel share its name)
PREDICTIONS = {
    "kernels:zqfp-w4a8": ("zqfp_repacked_prediction.py", (("predict", "fp4-fp8-decode", (), {}),
                                                          ("predict_prefill", "fp4-fp8-prefill", ("quantize-fp8",), {}),
                                                          ("predict_fp8_fp8", "fp8-fp8-scaled", ("quantize-fp8",), {}))),
    "kernels:illm-w8a8": ("illm_int_mm_prediction.py", (("predict", "illm-matmul-w8", (), {"matmul": "int_mm"}),)),
}


def against_prediction(key: str, runs: list) -> list[str]:
    """The rows of a run that a prediction made before any GPU ran them covers (``PREDICTIONS``: its
    script's functions, from the H200 rows of caa2c67), measured against the predicted range; nothing
    where the run has none of them (a run of the first kernels)."""
    import importlib.util

    if key not in PREDICTIONS:
        return []
    script, parts = PREDICTIONS[key]
    rows = {(r["shape"], r["M"], r["kernel"]): r for _, data in runs for r in data["results"]}
    spec = importlib.util.spec_from_file_location(script[:-3], Path(__file__).with_name(script))
    pred = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pred)
    out = []
    for fn, kernel, added, recorded in parts:
        for p in sorted(getattr(pred, fn)(pred.DEFAULT), key=lambda p: (p["M"], p["shape"])):
            keys = [(p["shape"], p["M"], k) for k in (kernel, *added)]
            if not all(k in rows for k in keys) or any(rows[keys[0]].get(f) != v for f, v in recorded.items()):
                continue
            us = sum(rows[k]["us"] for k in keys)
            lo, hi = p["predicted_us"]
            where = "within" if lo <= us <= hi else ("faster" if us < lo else "slower")
            out.append(f"| {kernel}{' + ' + ' + '.join(added) if added else ''} | {p['shape']} ({p['N']} x {p['K']}) | "
                       f"{p['M']} | {lo:.1f}-{hi:.1f} | {us:.1f} | {where} |")
    if not out:
        return []
    return ["", f"Against the prediction made before this ran (benchmarks/{script}):", "",
            "| measured | linear (N x K) | M | predicted us | measured us | measured is |", "|---|---|---|---|---|---|"] + out


def hadamard_table(data: dict) -> list[str]:
    out = ["| order (factors) | M | call us | copy of the same bytes us | call / copy | timing |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['order']} ({r['factors']}) | {r['m']} | {r['kernel_us']:.1f} | {r['copy_us']:.1f} | "
                   f"{r['kernel_us'] / r['copy_us']:.1f}x | {r.get('timing', 'eager')} |")
    return out


def glue_table(data: dict) -> list[str]:
    out = ["| op | tokens | torch ops us | kernel us | torch / kernel | check | timing |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['op']} | {r['tokens']} | {r['torch_us']:.2f} | {r['kernel_us']:.2f} | {r['speedup']:.2f}x | "
                   f"{r['check']} | {r['timing']} |")
    return out


def e2e_table(data: dict) -> list[str]:
    out = ["| mode | measure | original | quantized | quantized / original |", "|---|---|---|---|---|"]
    for mode, res in (data.get("modes") or {"": data}).items():
        q, o = res["quantized"], res["original_speed"]
        for a, b in zip(o["decode"], q["decode"]):
            out.append(f"| {mode} | decode batch {a['batch']}, tokens/s | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
                       f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x |")
        if o.get("prefill_tokens_per_s") and q.get("prefill_tokens_per_s"):
            out.append(f"| {mode} | prefill {q.get('prefill_tokens')} tokens, tokens/s | {o['prefill_tokens_per_s']:,.0f} | "
                       f"{q['prefill_tokens_per_s']:,.0f} | {q['prefill_tokens_per_s'] / o['prefill_tokens_per_s']:.2f}x |")
    return out


def main(folder: str) -> None:
    found = _load(Path(folder))
    roofline = found.get("roofline", [(None, None)])[0][1]
    mma = found.get("mma_peak", [(None, None)])[0][1]
    for key, runs in found.items():
        if key == "roofline":
            continue
        for path, data in runs if key in ("e2e", "hadamard", "glue", "mma_peak", "decode_variants") else [runs[0]]:
            print(f"### {key} — {path if key in ('e2e', 'hadamard', 'glue') else ', '.join(str(p) for p, _ in runs)}\n")
            print(_env(data) + "\n")
            if key == "kernels:is-w4a8":
                lines = w4a8_table(runs, roofline) + prefill_bm64_table(runs) + prefill_of_ceiling(runs, mma)
            elif key == "mma_peak":
                lines = mma_peak_table(data)
            elif key == "decode_variants":
                lines = decode_variants_table(data)
            elif key.startswith("kernels:"):
                lines = quik_table(runs) + (quik_against_prediction(runs) if key == "kernels:quik-w4a4" else []) \
                    + against_prediction(key, runs)
            elif key == "hadamard":
                lines = hadamard_table(data)
            elif key == "glue":
                lines = glue_table(data)
            else:
                print(f"{data.get('target')} against {data.get('original')}\n")
                lines = e2e_table(data)
            print("\n".join(lines) + "\n")


def merge(out: Path, files: list[Path], plot: Path | None = None) -> dict:
    from qconvert import bench

    parts = [json.loads(f.read_text()) for f in files]
    if not parts or len({p.get("scheme") for p in parts}) != 1 or any(p.get("kind") != "kernels" for p in parts):
        raise SystemExit(f"--merge: needs kernel results of one scheme, got {[str(f) for f in files]}")
    rows = [r for p in parts for r in p["results"]]
    result = {**parts[0], "results": rows, "merged_from": [f.name for f in files]}
    result["summary"] = bench.kernel_summary(rows, result["scheme"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({len(rows)} rows from {len(files)} files)")
    if plot is not None:
        bench.plot_kernels(result, plot)
        print(f"wrote {plot}")
    return result


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="a results folder; with --merge, the per-M JSON files")
    ap.add_argument("--merge", type=Path, metavar="OUT.json", help="merge the kernel results given into one file")
    ap.add_argument("--plot", type=Path, metavar="PNG", help="with --merge: the speed-up plot")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, [p for p in args.paths if p.resolve() != args.merge.resolve()], args.plot)
    elif len(args.paths) == 1 and args.paths[0].is_dir() and not args.plot:
        main(str(args.paths[0]))
    else:
        ap.error("give one results folder, or --merge OUT.json [--plot PNG] FILES...")
