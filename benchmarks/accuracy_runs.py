"""Collect finished accuracy runs (quantized OUTs that `qconvert eval` has scored) into a JSON file.

    python benchmarks/accuracy_runs.py OUT [OUT ...] [--label TEXT] [--float-path TEXT]
                                       [--results benchmarks/results/accuracy_runs.json]

Each OUT was made by ``qconvert quantize ... -o OUT`` and scored by ``qconvert eval OUT --data-file
wiki.test.raw --seqlen 512 --max-windows 40`` (docs/accuracy.md's protocol), which keeps its result
in OUT/eval.json.  One row per OUT: the scheme, the parameters that differ from the preset, the
rotation, the calibration (source, samples, seed, asym), the float path that calibrated (qconvert.json's
``float_path``; ``--float-path`` supplies it for an OUT made before the report recorded it, and the
row says it was given), the last WikiText-2 perplexity of that protocol and its ratio to FP, and the
commit of this tree.  Rows of the same OUT name and float path are replaced, so a re-run updates
them.  A table of all rows is printed.  A probe for docs/accuracy.md, not a product path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qconvert.schemes_registry import load_scheme  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "accuracy_runs.json"
FP = 28.972  # SmolLM2-135M-Instruct, WikiText-2 test, 40 x 512 (docs/accuracy.md)
PROTOCOL = {"dataset": "wikitext2", "seqlen": 512, "windows": 40}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def row(out: Path, label: str | None, float_path: str | None) -> dict:
    """The row of one scored OUT; a clear error when OUT lacks the report or the protocol's score."""
    report_file, eval_file = out / "qconvert.json", out / "eval.json"
    if not report_file.is_file():
        raise SystemExit(f"{out} has no qconvert.json: pass a finished qconvert quantize output")
    report = json.loads(report_file.read_text())
    scores = [e for e in (json.loads(eval_file.read_text()) if eval_file.is_file() else [])
              if all(e.get(k) == v for k, v in PROTOCOL.items())]
    if not scores:
        raise SystemExit(f"{out} has no WikiText-2 40 x 512 score: run qconvert eval {out} --data-file wiki.test.raw "
                         "--seqlen 512 --max-windows 40 first")
    scheme = report["scheme"]
    preset = load_scheme(scheme["name"]).params
    changed = {k: v for k, v in scheme["params"].items() if preset.get(k) != v}
    calib = report.get("calibration") or {}
    recorded = report.get("float_path")
    ppl = scores[-1]["perplexity"]
    return {
        "out": out.name, "label": label or out.name, "scheme": scheme["name"], "params_changed": changed,
        "rotation": (report.get("rotation") or {}).get("mode", "none")
        + ("+online" if (report.get("rotation") or {}).get("online") else ""),
        "calibration": {k: calib.get(k) for k in ("source", "nsamples", "seqlen", "seed", "asym")},
        "float_path": recorded or float_path or "not recorded",
        "float_path_given": recorded is None and float_path is not None,
        "perplexity": ppl, "ratio_to_fp": round(ppl / FP, 4), "collected_at_commit": _commit(),
    }


def table(rows: list[dict]) -> str:
    lines = [f"{'label':28} {'scheme':10} {'changed':22} {'calib':5} {'seed':>4} {'asym':>5} {'ppl':>8} {'xFP':>6}  "
             "float path"]
    for r in rows:
        c = r["calibration"]
        lines.append(f"{r['label'][:28]:28} {r['scheme'][:10]:10} {json.dumps(r['params_changed'])[:22]:22} "
                     f"{c.get('source')!s:5} {c.get('seed')!s:>4} {c.get('asym')!s:>5} "
                     f"{r['perplexity']:8.3f} {r['ratio_to_fp']:6.3f}  "
                     f"{r['float_path']}{' (given)' if r['float_path_given'] else ''}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outs", nargs="+", type=Path)
    ap.add_argument("--label", help="one label for every OUT given (default: the OUT's name)")
    ap.add_argument("--float-path", help="the float path of OUTs whose report does not record it")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = json.loads(args.results.read_text()) if args.results.is_file() else []
    for out in args.outs:
        new = row(out, args.label, args.float_path)
        rows = [r for r in rows if (r["out"], r["float_path"]) != (new["out"], new["float_path"])] + [new]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
