"""Golden files: the native format cannot drift silently, for any of the twelve layouts.

A tiny Llama with platform-independent weights is quantized once per layout family; every
output tensor's name, dtype, shape and sha256, the quantization_config, the report rows and
the logits the loaded OUT computes on fixed tokens must equal tests/golden/*.json.
Round-to-nearest bases keep the weights' arithmetic exact; the calibrated layouts (QUIK's
outlier channels, I-LLM's smoothing) read a tiny calibration text through float forward
passes, reproducible on one float path: conftest.py pins torch's and MKL's kernels to
AVX2 (an AVX-512 CPU changes the sums' order and these tensors).  MKL still picks its kernels by
the CPU's vendor: where a calibrated case's bytes differ on another vendor's CPU, that vendor's
own pinned file is in tests/golden/<vendor>/ (helpers.GOLDEN_VENDOR made the ones beside it).

After an intended format change, regenerate with
QCONVERT_UPDATE_GOLDEN=1 pytest tests/test_golden.py (on each vendor's CPU that has files),
bump FORMAT_VERSION and say so in CHANGELOG.md and docs/format.md.  On another vendor's CPU the
update writes only the cases that differ from the main files, into tests/golden/<vendor>/.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import GOLDEN_VENDOR, TEXT, cpu_vendor, golden_state, tiny_config, write_model
from qconvert import load, quantize
from qconvert.calibration_text import CalibSettings
from qconvert.formats.safetensors_io import ShardedReader
from qconvert.layouts import available_layouts
from qconvert.schemes_registry import load_scheme, with_params

GOLDEN = Path(__file__).parent / "golden"
TOKENS = torch.tensor([[5, 17, 42, 3, 88, 61, 9, 30, 71, 2, 14, 50]])

# golden file stem -> (scheme, what it pins); every layout appears at least once
CASES = {
    "is-w4a8-rtn": ("is-w4a8-rtn", {"w4a8-is"}),
    "w4a8-fs": ("w4a8-fs", {"w4a8-fs"}),
    "w4a16-rtn": ("w4a16-gptq", {"w4a16"}),
    "w4a16-zp-rtn": ("w4a16-gptq", {"w4a16-zp"}),
    "zqfp-w4a8-rtn": ("zqfp-w4a8", {"fp4-fp8"}),
    "zqfp-w8a8": ("zqfp-w8a8", {"fp8-fp8"}),
    "w8a8-rtn": ("w8a8", {"w8a8"}),
    "quik-w4a4-rtn": ("quik-w4a4", {"quik-w4a4", "quik-w8a8"}),
    "quik-w8a8-rtn": ("quik-w8a8", {"quik-w8a8"}),
    "illm-w8a8-rtn": ("illm-w8a8", {"illm-w8a8"}),
    "illm-w4a8-rtn": ("illm-w4a8", {"illm-w4a8"}),
    "illm-w4a4-rtn": ("illm-w4a4", {"illm-w4a4"}),
}
PARAMS = {"w4a16-zp-rtn": {"symmetric": False}}  # --param overrides of a case
OLD_NAMES = {"is-w4a8-rtn": "tiny-llama-is-w4a8-rtn", "w4a8-fs": "tiny-llama-w4a8-fs"}  # pinned before the others


def _digest(out: Path) -> dict:
    reader = ShardedReader(out)
    tensors = {}
    for name in sorted(reader.keys()):
        t = reader.get(name)
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        tensors[name] = {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest()}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    qc.pop("qconvert_version")
    report = json.loads((out / "qconvert.json").read_text())
    return {"quantization_config": qc, "tensors": tensors, "layers": report["layers"]}


def _logits(out: Path) -> list[list[float]]:
    model = load(out)
    with torch.no_grad():
        logits = model(TOKENS).logits[0].float()
    return [[float(f"{v:.7g}") for v in row[:16].tolist()] for row in logits]


@pytest.fixture(scope="module")
def golden_src(tmp_path_factory):
    """vocab -> source: 96 for the two files pinned first (no calibration), 300 for the rest
    (the tiny tokenizer's byte alphabet needs more than 96 ids to tokenize the calibration text)."""
    d = tmp_path_factory.mktemp("golden")
    (d / "calib.txt").write_text(TEXT)
    srcs = {}
    for vocab in (96, 300):
        cfg = tiny_config(hidden=64, intermediate=160, layers=2, vocab=vocab)
        srcs[vocab] = write_model(d / f"src{vocab}", cfg, state=golden_state(cfg), tokenizer=vocab > 96)
    return srcs


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_format_matches_golden(tmp_path, golden_src, case):
    scheme, layouts = CASES[case]
    if case in PARAMS:
        scheme = with_params(load_scheme(scheme), PARAMS[case])
    src = golden_src[96 if case in OLD_NAMES else 300]
    calib = CalibSettings("file", str(src.parent / "calib.txt"), nsamples=4, seqlen=32)
    out = quantize(str(src), scheme, tmp_path / "out", progress=False, base="rtn", calib=calib,
                   rotate="none")  # the goldens pin the format of an unrotated conversion (rotation: test_rotation.py)
    got = _digest(out)
    assert set(got["quantization_config"]["modules"].values()) == layouts
    got["logits"] = _logits(out)
    name = f"{OLD_NAMES.get(case, 'tiny-llama-' + case)}.json"
    path = _update_golden(name, got) if os.environ.get("QCONVERT_UPDATE_GOLDEN") else _golden_path(name)
    want = json.loads(path.read_text())
    assert got["quantization_config"] == want["quantization_config"]
    assert list(got["tensors"]) == list(want["tensors"])
    for name, entry in want["tensors"].items():
        assert got["tensors"][name] == entry, name
    assert got["layers"] == want["layers"]
    # decoded outputs: the same arithmetic in the same order gives the same bits here; the
    # tolerance only absorbs another BLAS's float summation order in the unquantized parts
    got_l, want_l = torch.tensor(got["logits"]), torch.tensor(want["logits"])
    assert _logits_close(got_l, want_l), (got_l - want_l).abs().max()


def _logits_close(got_l: torch.Tensor, want_l: torch.Tensor) -> bool:
    return torch.allclose(got_l, want_l, rtol=1e-5, atol=1e-5 * float(want_l.abs().max()))


def _golden_path(name: str) -> Path:
    """This CPU vendor's own pinned file if it has one, else the main one."""
    own = GOLDEN / cpu_vendor() / name
    return own if own.is_file() else GOLDEN / name


def _update_golden(name: str, got: dict) -> Path:
    """QCONVERT_UPDATE_GOLDEN: write ``got`` as the main file on GOLDEN_VENDOR's CPU; on another
    vendor's, as that vendor's own file only where it differs from the main file (else drop it).
    Returns the file the test then compares with."""
    main, own = GOLDEN / name, GOLDEN / cpu_vendor() / name
    text = json.dumps(got, indent=1, sort_keys=True) + "\n"
    if cpu_vendor() == GOLDEN_VENDOR:
        main.write_text(text)
        return main
    if not main.is_file():
        pytest.fail(f"{name}: make the main golden files on an {GOLDEN_VENDOR} CPU first")
    if _matches(got, json.loads(main.read_text())) is None:
        own.unlink(missing_ok=True)
        return main
    own.parent.mkdir(exist_ok=True)
    own.write_text(text)
    return own


def _matches(got: dict, want: dict) -> str | None:
    """None if ``got`` is ``want`` (the bytes, and the logits to the test's tolerance), else what differs."""
    if got["quantization_config"] != want["quantization_config"] or got["tensors"] != want["tensors"]:
        return "tensors or quantization_config"
    if got["layers"] != want["layers"]:
        return "report rows"
    if not _logits_close(torch.tensor(got["logits"]), torch.tensor(want["logits"])):
        return "logits"
    return None


def test_vendor_files_only_where_the_bytes_differ():
    """Every file under tests/golden/<vendor>/ stands beside a main file of the same name, belongs
    to another vendor than the main files', pins other bytes or figures than it (a copy would pin
    nothing new), and is of the same format: the same quantization_config and the same tensors'
    names, dtypes and shapes (a vendor file left behind by a format change fails here, on any CPU)."""
    for path in GOLDEN.glob("*/*.json"):
        main = GOLDEN / path.name
        assert main.is_file() and path.parent.name not in (GOLDEN_VENDOR, "", "unknown"), path
        own, ref = json.loads(path.read_text()), json.loads(main.read_text())
        assert _matches(own, ref) is not None, path
        assert own["quantization_config"] == ref["quantization_config"], path
        assert {k: (v["dtype"], v["shape"]) for k, v in own["tensors"].items()} == \
            {k: (v["dtype"], v["shape"]) for k, v in ref["tensors"].items()}, path


def test_every_builtin_layout_has_a_golden_file():
    from qconvert.layouts import BUILTIN

    pinned = set().union(*(layouts for _, layouts in CASES.values()))
    assert pinned == set(BUILTIN) and set(BUILTIN) <= set(available_layouts())

