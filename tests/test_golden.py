"""Golden files: the native format cannot drift silently.

A tiny Llama with platform-independent weights is quantized with each preset; every
output tensor's name, dtype, shape and sha256, and the quantization_config, must equal
tests/golden/*.json.  After an intended format change, regenerate with
QCONVERT_UPDATE_GOLDEN=1 pytest tests/test_golden.py, bump FORMAT_VERSION and say so in
CHANGELOG.md and docs/format.md.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest

from helpers import golden_state, tiny_config, write_model
from qconvert import quantize
from qconvert.formats.safetensors_io import ShardedReader

GOLDEN = Path(__file__).parent / "golden"


def _digest(out: Path) -> dict:
    reader = ShardedReader(out)
    tensors = {}
    for name in sorted(reader.keys()):
        t = reader.get(name)
        raw = t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
        tensors[name] = {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest()}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    qc.pop("qconvert_version")
    report = json.loads((out / "qconvert.json").read_text())
    layers = [{k: v for k, v in r.items()} for r in report["layers"]]
    return {"quantization_config": qc, "tensors": tensors, "layers": layers}


@pytest.mark.parametrize("scheme", ["is-w4a8-rtn", "w4a8-fs"])
def test_native_format_matches_golden(tmp_path, scheme):
    """Round-to-nearest bases: exact integer arithmetic, the same bytes on every machine."""
    cfg = tiny_config(hidden=64, intermediate=160, layers=2, vocab=96)
    src = write_model(tmp_path / "src", cfg, state=golden_state(cfg), tokenizer=False)
    out = quantize(str(src), scheme, tmp_path / "out", progress=False, base="rtn")
    got = _digest(out)
    path = GOLDEN / f"tiny-llama-{scheme}.json"
    if os.environ.get("QCONVERT_UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got["quantization_config"] == want["quantization_config"]
    assert list(got["tensors"]) == list(want["tensors"])
    for name, entry in want["tensors"].items():
        assert got["tensors"][name] == entry, name
    assert got["layers"] == want["layers"]
