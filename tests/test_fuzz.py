"""Bounded fuzzing of the native-format reader and of `verify` (hypothesis).

Random corruptions of a real output (byte flips, truncations, insertions, in any file, with
or without a re-sealed manifest) must end in a clear failure: the reader raises only
QConvertError, `verify` never raises and never says OK for a corruption the manifest still
covers.  Each test runs CASES examples.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import tiny_config, write_model
from qconvert import quantize
from qconvert.errors import QConvertError
from qconvert.formats.native import write_manifest
from qconvert.formats.safetensors_io import SafetensorsFile, ShardedReader
from qconvert.verify import verify

# Deterministic in CI (derandomize); QCONVERT_FUZZ_CASES=2000 QCONVERT_FUZZ_RANDOM=1 explores further.
CASES = int(os.environ.get("QCONVERT_FUZZ_CASES", 300))
DERANDOMIZE = not os.environ.get("QCONVERT_FUZZ_RANDOM")
FILES = ["model.safetensors", "config.json", "qconvert.json", "manifest.json", "tokenizer.json"]
RAN = {"reader": 0, "verify": 0}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    src = write_model(d / "src", tiny_config(layers=1, hidden=32, intermediate=64, vocab=64, heads=2, kv_heads=1))
    return quantize(str(src), "is-w4a8-rtn", d / "out", group_size=32, progress=False)


mutation = st.tuples(
    st.sampled_from(["flip", "truncate", "insert"]),
    st.floats(0, 1, exclude_max=True),  # where, as a fraction of the file
    st.integers(1, 255),                # xor mask / inserted byte
)


def _mutate(path: Path, kind: str, where: float, value: int) -> None:
    raw = bytearray(path.read_bytes())
    i = int(where * len(raw))
    if kind == "flip":
        raw[i] ^= value
    elif kind == "truncate":
        del raw[i:]
    else:
        raw[i:i] = bytes([value])
    path.write_bytes(bytes(raw))


@settings(max_examples=CASES, deadline=None, derandomize=DERANDOMIZE, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutation, header_heavy=st.booleans())
def test_reader_raises_only_the_clear_error(made, m, header_heavy):
    kind, where, value = m
    if header_heavy:  # aim at the 8-byte length and the JSON header, where parsing happens
        where = where * 0.05
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        shutil.copyfile(made / "model.safetensors", path)
        _mutate(path, kind, where, value)
        RAN["reader"] += 1
        try:
            f = SafetensorsFile(path)
            for name in f.keys():
                f.get(name)
        except QConvertError as e:
            assert str(path) in str(e)


@settings(max_examples=CASES, deadline=None, derandomize=DERANDOMIZE, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(FILES), m=mutation, reseal=st.booleans())
def test_verify_never_crashes_and_never_passes_a_covered_corruption(made, target, m, reseal):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        shutil.copytree(made, out)
        before = (out / target).read_bytes()
        _mutate(out / target, *m)
        changed = (out / target).read_bytes() != before
        if target == "manifest.json" and changed:  # whitespace the JSON parser ignores changes nothing
            try:
                changed = json.loads((out / target).read_bytes()) != json.loads(before)
            except (ValueError, UnicodeDecodeError):
                changed = True
        if reseal and target != "manifest.json":
            (out / "manifest.json").unlink()
            write_manifest(out)  # the damage is now invisible to sha256: only deeper checks can see it
        RAN["verify"] += 1
        rep = verify(out, compare_source=False, save=False)
        if changed and not reseal:
            assert not rep.ok, f"{target} {m}: corruption passed verify"
        if rep.ok and reseal and target == "model.safetensors":
            ShardedReader(out)  # what verify passes, the reader reads


def test_report_case_counts():
    if not any(RAN.values()):
        pytest.skip("counts only after the fuzz tests of this file ran")
    print(f"\nfuzz cases run: reader {RAN['reader']}, verify {RAN['verify']}")
    assert RAN["reader"] >= CASES and RAN["verify"] >= CASES
