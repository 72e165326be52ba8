"""quantize --device cuda on a real GPU (skipped without one; benchmarks/gpu_check.sh, part a).

- Every calibrated case runs on cuda, is reproducible (two runs, the same bytes) and close to
  the CPU run (verify against the source passes);
- a run killed in the middle and resumed on cuda writes the bytes of an uninterrupted cuda run;
- the report says ``"device": "cuda"``.
"""

from __future__ import annotations

import json

import pytest
import torch

from test_quantize_device import CASES, _run, digest, resume_matches_whole, sources  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_walk_is_reproducible_and_close_to_the_cpu(tmp_path, sources, case):  # noqa: F811
    from qconvert.verify import verify

    a = _run(sources, case, tmp_path / "a", device="cuda")
    b = _run(sources, case, tmp_path / "b", device="cuda")
    assert digest(a) == digest(b)
    assert json.loads((a / "qconvert.json").read_text())["device"] == "cuda"
    model = CASES[case][0]
    rep = verify(a, against=str(sources[model]), save=False)
    assert rep.ok, rep.failures


def test_cuda_resume_is_bit_identical(tmp_path, sources):  # noqa: F811
    resume_matches_whole(tmp_path, sources, "cuda")


def test_cuda_asymmetric_calibration(tmp_path, sources):  # noqa: F811
    """--asym-calib on cuda: the float stream and the float copy of each block on the GPU;
    reproducible, close to the source, and recorded."""
    from qconvert.calibration_text import CalibSettings
    from qconvert.pipeline import quantize
    from qconvert.verify import verify

    src = sources["dense"]
    calib = CalibSettings("file", str(src.parent / "calib.txt"), nsamples=4, seqlen=32, asym=0.25)
    a, b = (quantize(str(src), "is-w4a8", tmp_path / n, group_size=32, progress=False, calib=calib, device="cuda")
            for n in ("a", "b"))
    assert digest(a) == digest(b)
    report = json.loads((a / "qconvert.json").read_text())
    assert report["device"] == "cuda" and report["calibration"]["asym"] == 0.25
    assert report["float_path"].startswith(f"cuda {torch.cuda.get_device_name()} (sm_")
    assert all("asym_shift" in r for r in report["layers"])
    rep = verify(a, against=str(src), save=False)
    assert rep.ok, rep.failures
