"""The native qconvert output directory (specified in docs/format.md).

    OUT/
      config.json                    the source config + "quantization_config" (quant_method "qconvert")
      model.safetensors              or model-0000i-of-0000n.safetensors + model.safetensors.index.json
      qconvert.json                  per-layer report (shape, bits, group size, α, headroom, bytes)
      tokenizer files                carried over from the source
      manifest.json                  sha256 and size of every other file
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qconvert.errors import QConvertError

FORMAT_NAME = "qconvert-native"
FORMAT_VERSION = 2  # what quantize writes; 2 (0.4.0): QUIK's act_clip in the method config
READ_VERSIONS = (1, 2)  # what this qconvert reads: a version-1 OUT runs as written (act_clip absent: 1)
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


EVAL_FILE = "eval.json"  # written by qconvert eval (qconvert.evaluate.save_result)


def perplexity_rows(saved) -> list[dict]:
    """The perplexity rows of a saved list (or one row); anything else in it is left out."""
    if isinstance(saved, dict):
        saved = [saved]
    return [r for r in saved if isinstance(r, dict) and "perplexity" in r] if isinstance(saved, list) else []


def saved_evals(path: Path) -> list[dict]:
    """The perplexity rows ``qconvert eval`` saved (OUT/eval.json: a list, or one row); none where
    the file is missing or unreadable."""
    try:
        return perplexity_rows(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return []


EXPORT_MARKER = "qconvert_export.json"  # what a qconvert export carries (formats/compressed_tensors.py writes it)


def write_manifest(out: Path) -> dict:
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(out).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_quant_config(out: Path) -> tuple[dict, dict]:
    """(config dict without quantization_config, quantization_config) of a native OUT."""
    path = Path(out) / "config.json"
    if not Path(out).is_dir():
        there = "" if Path(out).exists() else " (nothing is there)"
        raise QConvertError(f"{out} is not a directory{there}; pass the -o directory qconvert quantize wrote (a model to "
                            f"start from, such as a Hub id or smollm2-135m, is quantized first: qconvert quantize "
                            f"{out} -o OUT)")
    if not path.is_file():
        raise QConvertError(f"{out} has no config.json; it is not a qconvert output directory")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QConvertError(f"{path} is not valid JSON ({e}); re-run qconvert quantize") from e
    qc = cfg.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "qconvert":
        other = qc.get("quant_method") if isinstance(qc, dict) else None
        if other is not None:  # an export of an OUT, or a model quantized elsewhere
            raise QConvertError(f"{out} is a {other} checkpoint, not a qconvert output; pass the OUT that qconvert "
                                "quantize wrote" + (" (and exported it from)" if other == "compressed-tensors" else ""))
        raise QConvertError(f"{out} is not a qconvert output (config.json has no qconvert quantization_config)")
    if qc.get("format") != FORMAT_NAME or qc.get("format_version") not in READ_VERSIONS:
        raise QConvertError(
            f"{out} uses format {qc.get('format')!r} version {qc.get('format_version')!r}; this qconvert reads "
            f"{FORMAT_NAME} versions {', '.join(map(str, READ_VERSIONS))}: upgrade qconvert or re-quantize"
        )
    return cfg, qc


def is_native(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        qc = json.loads(p.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "qconvert"
