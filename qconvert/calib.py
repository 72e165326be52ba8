"""Text for evaluation (and, later, calibration): WikiText-2 and local files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qconvert.errors import QConvertError

DATASETS = ("wikitext2",)


def _read_local(path: Path) -> str:
    if not path.is_file():
        raise QConvertError(f"data file {path} not found; pass an existing file with --data-file")
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        texts.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise QConvertError(f"{path}:{i}: each line must be a JSON object with a 'text' field") from e
        return "\n\n".join(texts)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QConvertError(f"{path} is not UTF-8 text") from e


def wikitext_join(raw: str) -> str:
    """The usual protocol: the split's rows (the file's lines) joined with "\\n\\n"."""
    return "\n\n".join(raw.splitlines(keepends=True))


def load_eval_text(dataset: str, data_file: str | os.PathLike | None = None, split: str = "test") -> str:
    """Evaluation text of ``dataset`` from ``data_file`` if given, else from the Hub's datasets."""
    if dataset not in DATASETS:
        raise QConvertError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if data_file is not None:
        text = _read_local(Path(data_file))
        return wikitext_join(text) if Path(data_file).suffix != ".jsonl" else text
    hint = (
        f"pass the raw WikiText-2 {split} file with --data-file PATH "
        f"(wiki.{split}.raw from the wikitext-2-raw-v1 release)"
    )
    try:
        import datasets  # optional
    except ImportError:
        raise QConvertError(f"no --data-file given and the 'datasets' package is not installed; {hint}") from None
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as e:  # offline, cache miss, or a Hub error
        raise QConvertError(f"could not fetch WikiText-2 from the Hub ({type(e).__name__}); {hint}") from e
    return "\n\n".join(rows)
