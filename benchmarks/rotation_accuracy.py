"""What a residual-stream rotation buys on the accuracy protocol of docs/accuracy.md (issue #22).

    python benchmarks/rotation_accuracy.py [--rows ID,ID,...] [--list] [--work DIR] [--results F.json]

Each row quantizes SmolLM2-135M-Instruct (``smollm2-135m``) with a scheme, read through
``RotatedSource(resolve_source("smollm2-135m"), mode, seed=0)`` (or the plain source for rotate
"none"), calibrated as docs/accuracy.md does (``--calib c4 --data-file C4``: 128 x 512 tokens of the
C4 excerpt, seed 0), then evaluates it exactly as ``qconvert eval OUT --data-file wiki.test.raw
--seqlen 512 --max-windows W`` does (qconvert.evaluate: the OUT through ``qconvert.load``; the result
is kept in OUT/eval.json too).  Rows of kind "float" quantize nothing: they evaluate the float model
(the plain source, or ``RotatedSource.load_model()``), the sanity check that the rotation leaves the
function unchanged.

Every finished row is appended to ``benchmarks/results/rotation_accuracy.json`` (scheme, rotate,
params overrides, windows, perplexity, ratio to FP on the same windows, quantize and eval seconds,
commit); rows already there are skipped, so the command can be repeated after an interruption (an
OUT already complete under --work is evaluated, not re-quantized).  A table of all rows is printed
at the end.  A probe for docs/accuracy.md, not a product path.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"
C4 = SHARED / "c4-en" / "c4-train.00000-of-01024.first1000.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "rotation_accuracy.json"
SOURCE = "smollm2-135m"
SEQLEN = 512
# FP perplexity of the plain source on the first W windows (docs/accuracy.md); a measured
# "fp-none" row of the same W in the results file takes precedence
FP_DOC = {40: 28.972, 10: 33.874}

# the calibration of docs/accuracy.md; a row's 6th element overrides any of it
# (asym explicit: a row without one must not take the preset's default --asym-calib)
C4_CALIB = {"source": "c4", "data_file": str(C4), "nsamples": 128, "seqlen": SEQLEN, "seed": 0, "asym": 0.0}
# the README's first command: no data, the model writes its own tokens (its default shape)
SELF_CALIB = {"source": "self", "data_file": None, "nsamples": None, "seqlen": None, "asym": 0.0}

# (id, scheme or None for the float model, rotate mode, method-param overrides, windows[, CalibSettings overrides])
ROWS = [
    ("fp-none", None, "none", {}, 40),
    ("fp-hadamard", None, "hadamard", {}, 40),
    ("is-w4a8-hadamard", "is-w4a8", "hadamard", {}, 40),
    ("w4a16-gptq-hadamard", "w4a16-gptq", "hadamard", {}, 40),
    ("quik-w4a4-hadamard", "quik-w4a4", "hadamard", {}, 40),
    ("quik-w4a4-o0-hadamard", "quik-w4a4", "hadamard", {"outliers": 0}, 40),
    ("illm-w4a4-hadamard", "illm-w4a4", "hadamard", {}, 10),
    ("illm-w8a8-hadamard", "illm-w8a8", "hadamard", {}, 40),
    ("illm-w8a8-hadamard-10w", "illm-w8a8", "hadamard", {}, 10),
    # the integer runtime's own online transform (integer Hadamard before down_proj)
    ("illm-w4a4-online", "illm-w4a4", "hadamard+online", {}, 40),
    ("illm-w4a8-online", "illm-w4a8", "hadamard+online", {}, 40),
    ("illm-w8a8-online", "illm-w8a8", "hadamard+online", {}, 40),
    ("is-w4a8-random", "is-w4a8", "random", {}, 40),
    # --rotate hadamard+online (the run-time Hadamard before down_proj); "all4": down_proj in W4A4 too
    ("is-w4a8-online", "is-w4a8", "hadamard+online", {}, 40),
    ("w4a16-gptq-online", "w4a16-gptq", "hadamard+online", {}, 40),
    ("quik-w4a4-o0-online", "quik-w4a4", "hadamard+online", {"outliers": 0}, 40),
    ("quik-w4a4-o0-all4-hadamard", "quik-w4a4", "hadamard", {"outliers": 0, "int8_layers": []}, 40),
    ("quik-w4a4-o0-all4-online", "quik-w4a4", "hadamard+online", {"outliers": 0, "int8_layers": []}, 40),
    ("fp-random", None, "random", {}, 40),
    # asymmetric calibration (--asym-calib ALPHA, GPTAQ): a 6th element overrides CalibSettings
    ("is-w4a8-online-asym25", "is-w4a8", "hadamard+online", {}, 40, {"asym": 0.25}),
    ("is-w4a8-online-asym100", "is-w4a8", "hadamard+online", {}, 40, {"asym": 1.0}),
    ("w4a16-gptq-hadamard-asym25", "w4a16-gptq", "hadamard", {}, 40, {"asym": 0.25}),
    ("quik-w4a4-o0-online-asym25", "quik-w4a4", "hadamard+online", {"outliers": 0}, 40, {"asym": 0.25}),
    ("is-w4a8-asym25", "is-w4a8", "none", {}, 40, {"asym": 0.25}),
    ("quik-w4a4-asym25", "quik-w4a4", "none", {}, 40, {"asym": 0.25}),
    ("is-w4a8-hadamard-asym25", "is-w4a8", "hadamard", {}, 40, {"asym": 0.25}),
    # the README's first command (--calib self) with the preset's rotation, other seeds, asym
    ("is-w4a8-self-hadamard", "is-w4a8", "hadamard", {}, 40, SELF_CALIB),
    ("is-w4a8-self1-hadamard", "is-w4a8", "hadamard", {}, 40, {**SELF_CALIB, "seed": 1}),
    ("is-w4a8-self-hadamard-asym25", "is-w4a8", "hadamard", {}, 40, {**SELF_CALIB, "asym": 0.25}),
    ("is-w4a8-self1-hadamard-asym25", "is-w4a8", "hadamard", {}, 40, {**SELF_CALIB, "seed": 1, "asym": 0.25}),
    ("quik-w4a4-o0-online-asym50", "quik-w4a4", "hadamard+online", {"outliers": 0}, 40, {"asym": 0.5}),
    ("quik-w4a4-asym50", "quik-w4a4", "none", {}, 40, {"asym": 0.5}),
    ("w4a16-gptq-hadamard-asym50", "w4a16-gptq", "hadamard", {}, 40, {"asym": 0.5}),
    # the presets whose default was not measured
    ("w8a8-hadamard", "w8a8", "hadamard", {}, 40),
    ("quik-w8a8-hadamard", "quik-w8a8", "hadamard", {}, 40),
    ("zqfp-w4a8-hadamard", "zqfp-w4a8", "hadamard", {}, 40),
    ("zqfp-w8a8-hadamard", "zqfp-w8a8", "hadamard", {}, 40),
    # asymmetric calibration on the presets that had not measured it (2026-12-06)
    ("zqfp-w4a8-hadamard-asym25", "zqfp-w4a8", "hadamard", {}, 40, {"asym": 0.25}),
    ("zqfp-w4a8-asym25", "zqfp-w4a8", "none", {}, 40, {"asym": 0.25}),
    ("illm-w4a8-online-asym25", "illm-w4a8", "hadamard+online", {}, 40, {"asym": 0.25}),
    ("zqfp-w4a8-seed1", "zqfp-w4a8", "none", {}, 40, {"seed": 1}),
    ("zqfp-w4a8-hadamard-asym25-seed1", "zqfp-w4a8", "hadamard", {}, 40, {"asym": 0.25, "seed": 1}),
    # the preset (unrotated, symmetric) again on the AVX-512 float path the rows above ran on
    ("zqfp-w4a8-none-avx512", "zqfp-w4a8", "none", {}, 40),
    ("illm-w4a8-online-avx512", "illm-w4a8", "hadamard+online", {}, 40),
    ("fp-none-10w", None, "none", {}, 10),
    ("fp-hadamard-10w", None, "hadamard", {}, 10),
]


def _import_first(names: list[str], attr: str):
    """``attr`` from the first of ``names`` that imports and has it (modules may be moved)."""
    errors = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        if hasattr(mod, attr):
            return getattr(mod, attr)
        errors.append(f"{name}: no {attr}")
    raise ImportError(f"cannot find {attr}: " + "; ".join(errors))


def _commit() -> dict:
    def git(*args):
        try:
            # rstrip only: `status --porcelain` lines begin with a space that belongs to the status
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
        except (OSError, subprocess.CalledProcessError):
            return None

    dirty = git("status", "--porcelain", "--", "qconvert", "qconvert_kernels", "schemes")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "code_changes_uncommitted": [line[3:] for line in (dirty or "").splitlines()]}


def _source(rotate: str):
    from qconvert.source import resolve_source

    src = resolve_source(SOURCE)
    if rotate == "none":
        return src
    RotatedSource = _import_first(["qconvert.solvers.rotation", "qconvert.solvers", "qconvert.rotation"], "RotatedSource")
    mode, _, online = rotate.partition("+")  # "hadamard+online": also down_proj's input at run time
    return RotatedSource(src, mode=mode, seed=0, **({"online": True} if online == "online" else {}))


# every row here was measured before a preset param existed that the preset now sets: pinned to
# what the rows ran with (quik-w4a4's and illm-w4a4's act_clip = 0.9 came on 2026-12-02; the rows ran unclipped)
# and quik-w4a4's fp16 channels by mean square and range search down to 0.7, later that day: the rows
# chose them by max |x| and searched down to 0.8
PINNED = {"act_clip": 1}
PINNED_PER_SCHEME = {"quik-w4a4": {"outlier_select": "amax", "clip_min": 0.8}}


def _scheme(name: str, overrides: dict):
    load_scheme = _import_first(["qconvert.schemes_registry", "qconvert.schemes"], "load_scheme")
    sch = load_scheme(name)
    pinned = {**PINNED, **PINNED_PER_SCHEME.get(name, {})}
    overrides = {**{k: v for k, v in pinned.items() if k in sch.params}, **overrides}
    return dataclasses.replace(sch, params={**sch.params, **overrides}) if overrides else sch


def _eval_text() -> str:
    load_eval_text = _import_first(["qconvert.calib", "qconvert.calibration_text", "qconvert.evaluate"], "load_eval_text")
    return load_eval_text("wikitext2", str(WIKI))


def _complete(out: Path) -> bool:
    return (out / "qconvert.json").is_file() and (out / "config.json").is_file()


def run_row(row, work: Path) -> dict:
    from qconvert.evaluate import load_model_and_tokenizer, perplexity, save_result

    rid, scheme, rotate, overrides, windows, *more = row
    calib_overrides = more[0] if more else {}
    text = _eval_text()
    record = {"id": rid, "scheme": scheme or "fp (no quantization)", "rotate": rotate, "seed": 0 if rotate != "none" else None,
              "params": overrides, "windows": windows, "seqlen": SEQLEN, **({"calib": calib_overrides} if calib_overrides else {})}
    t_q = None
    if scheme is None:
        src = _source(rotate)
        model = src.load_model(torch.float32)
        tok = src.load_tokenizer()
        record["untied_head"] = bool(getattr(src, "untied", False))
        if rotate != "none":
            record["rotation"] = src.describe()
    else:
        CalibSettings = _import_first(["qconvert.calib", "qconvert.calibration_text", "qconvert.calibrate"], "CalibSettings")
        from qconvert.pipeline import quantize

        out = work / rid
        if _complete(out):
            print(f"[{rid}] {out} already complete: evaluating it", flush=True)
            t_q = json.loads((out / "rotation_accuracy_quantize.json").read_text())["seconds"] \
                if (out / "rotation_accuracy_quantize.json").is_file() else None
        else:
            src = _source(rotate)
            calib = CalibSettings(**{**C4_CALIB, **calib_overrides})
            print(f"[{rid}] quantizing {SOURCE} (rotate {rotate}) with {scheme} {overrides or ''} -> {out}", flush=True)
            t0 = time.perf_counter()
            quantize(src, _scheme(scheme, overrides), out, force=True, progress=False, calib=calib,
                     rotate=rotate)  # explicit: a "none" row must not take the preset's default rotation
            t_q = time.perf_counter() - t0
            (out / "rotation_accuracy_quantize.json").write_text(json.dumps({"seconds": t_q}) + "\n")
            print(f"[{rid}] quantized in {t_q:.0f} s", flush=True)
        record["out"] = str(out)
        model, tok, _ = load_model_and_tokenizer(str(out))  # exactly what `qconvert eval OUT` loads
    t0 = time.perf_counter()
    res = perplexity(model, tok, text, seqlen=SEQLEN, max_windows=windows, progress=False)
    t_e = time.perf_counter() - t0
    if scheme is not None:  # as `qconvert eval OUT` keeps it
        save_result(Path(record["out"]), {"target": record["out"], "kind": "qconvert", "dataset": "wikitext2", **res.to_dict()})
    if res.windows != windows:
        raise RuntimeError(f"evaluated {res.windows} windows, not {windows}")
    record.update(ppl=res.perplexity, nll=res.nll, quantize_s=t_q, eval_s=t_e,
                  threads=torch.get_num_threads(), host=platform.machine(), torch=torch.__version__,
                  measured=time.strftime("%Y-%m-%d %H:%M:%S %Z"), **_commit())
    return record


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def fp_reference(results: list[dict], windows: int) -> tuple[float, str]:
    for r in results:
        if r["id"] in ("fp-none", "fp-none-10w") and r["windows"] == windows:
            return r["ppl"], "measured"
    return FP_DOC.get(windows), "docs/accuracy.md"


def table(results: list[dict]) -> str:
    lines = [f"{'id':<24} {'scheme':<22} {'rotate':<9} {'params':<16} {'win':>3} {'ppl':>10} {'xFP':>7} {'quant s':>8} {'eval s':>7}"]
    for r in results:
        fp, _ = fp_reference(results, r["windows"])
        ratio = r["ppl"] / fp if fp else float("nan")
        q = f"{r['quantize_s']:.0f}" if r.get("quantize_s") is not None else "-"
        params = {**r["params"], **r.get("calib", {})}
        lines.append(f"{r['id']:<24} {r['scheme']:<22} {r['rotate']:<9} {json.dumps(params) if params else '-':<16} "
                     f"{r['windows']:>3} {r['ppl']:>10.3f} {ratio:>7.3f} {q:>8} {r['eval_s']:>7.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", help="comma-separated row ids (default: all, in order)")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rotation_accuracy"), help="where the OUTs are written")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    by_id = {r[0]: r for r in ROWS}
    if args.list:
        for r in ROWS:
            print(*r)
        return
    wanted = args.rows.split(",") if args.rows else [r[0] for r in ROWS]
    unknown = [w for w in wanted if w not in by_id]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(by_id)}")
    args.work.mkdir(parents=True, exist_ok=True)
    for rid in wanted:
        results = load_results(args.results)
        if any(r["id"] == rid for r in results):
            print(f"[{rid}] already in {args.results}: skipped", flush=True)
            continue
        record = run_row(by_id[rid], args.work)
        fp, where = fp_reference(results, record["windows"])
        record["fp_ppl"], record["fp_from"] = fp, where
        record["ratio"] = record["ppl"] / fp if fp else None
        results = load_results(args.results) + [record]  # re-read: another process may have added rows
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, args.results)
        print(f"[{rid}] perplexity {record['ppl']:.3f} ({record['ratio']:.3f}x FP {fp} [{where}]) on {record['windows']} windows; "
              f"quantize {record['quantize_s'] or 0:.0f} s, eval {record['eval_s']:.0f} s", flush=True)
    print(table(load_results(args.results)))


if __name__ == "__main__":
    main()
