"""What ``qconvert eval --tasks ... --batch-size N`` buys: one lm-eval task timed at several batch sizes.

    python benchmarks/lmeval_batch.py TARGET [--batches 1,4,16] [--questions 100] [--device cpu|cuda]
                                      [--json F.json]

TARGET is anything ``qconvert eval`` takes (an OUT, an export, a SOURCE).  The task is built from
WikiText-2 valid (``../shared/data``), offline: each question is a line's first 24 words, its two
choices the next 12 words of that line and of another line (a multiple-choice task, so lm-eval scores
2 x QUESTIONS log-likelihood requests), written as a local YAML task (--include-path).  Each batch size
runs ``qconvert.lmeval.run_tasks`` once on the same model load (``qconvert eval --tasks`` loads it per
call too; the load is not timed), and the table shows seconds, requests per second, the speed-up over
the first batch size and the accuracy (equal at every batch size, or the batching changed an answer).
A benchmark, not a test: it prints a table and writes JSON (default benchmarks/results/lmeval_batch.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
VALID = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"


def write_task(directory: Path, questions: int) -> str:
    """A local multiple-choice task of ``questions`` WikiText-2 valid lines; its name."""
    lines = [ln.split() for ln in VALID.read_text(encoding="utf-8").splitlines()]
    lines = [w for w in lines if len(w) >= 36 and not w[0].startswith("=")][:questions + 1]
    if len(lines) <= questions:
        raise SystemExit(f"{VALID} has {len(lines)} usable lines, fewer than --questions {questions}")
    rows = []
    for i in range(questions):
        own, other = lines[i], lines[(i + 1) % len(lines)]
        choices = [" " + " ".join(own[24:36]), " " + " ".join(other[24:36])]
        label = i % 2  # the true continuation first or second
        rows.append({"q": " ".join(own[:24]), "choices": choices if label == 0 else choices[::-1], "label": label})
    data = directory / "wiki_next.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "wiki_next.yaml").write_text(
        f"task: qconvert_wiki_next\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n" 'doc_to_text: "{{q}}"\n' 'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return "qconvert_wiki_next"


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--device", default=None, help="cuda or cpu [default: cuda if usable]")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "lmeval_batch.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from qconvert import evaluate, lmeval
    from qconvert.bench import compute_dtype, environment, resolve_device

    dev = resolve_device(args.device, "python benchmarks/lmeval_batch.py TARGET")
    loaded = evaluate.load_model_and_tokenizer(args.target, dtype=compute_dtype(dev), device=str(dev))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "datasets")
        task = write_task(Path(tmp), args.questions)
        # the same model for every batch size: run_tasks' own load is replaced by the one above
        with mock.patch.object(evaluate, "load_model_and_tokenizer", lambda *a, **k: loaded):
            for b in (int(x) for x in args.batches.split(",")):
                t0 = time.perf_counter()
                res = lmeval.run_tasks(args.target, [task], include_path=tmp, num_fewshot=0, batch_size=b,
                                       device=str(dev))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                s = time.perf_counter() - t0
                acc = res.tasks[task]["acc,none"]
                rows.append({"batch_size": b, "seconds": round(s, 2), "requests_per_s": round(2 * args.questions / s, 2),
                             "acc": acc})
    for r in rows:
        r["speedup"] = round(rows[0]["seconds"] / r["seconds"], 2)
    print(f"{args.target} ({loaded[2]}) on {dev}, {args.questions} questions, {2 * args.questions} requests:")
    print(f"{'batch':>6} {'s':>8} {'req/s':>8} {'speed-up':>9} {'acc':>6}")
    for r in rows:
        print(f"{r['batch_size']:>6} {r['seconds']:>8.2f} {r['requests_per_s']:>8.2f} {r['speedup']:>8.2f}x {r['acc']:>6.3f}")
    record = {"target": str(args.target), "kind": loaded[2], "questions": args.questions, "rows": rows,
              "environment": {**environment(dev), "machine": platform.machine(), "threads": torch.get_num_threads()},
              "commit": _commit(), "command": f"python benchmarks/lmeval_batch.py {args.target} --batches {args.batches} "
                         f"--questions {args.questions} --device {dev.type}"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
