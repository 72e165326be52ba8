"""``qconvert eval`` on a GPU (the default where one is usable): perplexity through the OUT's CUDA
kernels in float16, kept with where it ran, against the same OUT's CPU score; lm-eval's batched
requests there.  Skipped without a GPU (benchmarks/gpu_check.sh runs it); the CPU side is
tests/test_cli.py and tests/test_lmeval.py."""

from __future__ import annotations

import json
import math

import pytest

from helpers import TEXT, quantize_tiny, run_cli
from qconvert_kernels.w4a8 import cuda as kcuda
from test_lmeval import task_dir  # noqa: F401  (the local lm-eval tasks, a fixture)

if not kcuda.available():
    pytest.skip("no CUDA device usable by cupy (sm_80+)", allow_module_level=True)


@pytest.mark.parametrize("scheme", ["is-w4a8-rtn", "illm-w8a8"])
def test_eval_runs_on_the_gpu_by_default(tiny_calib_src, tmp_path, scheme):
    """The same windows score within 1% of the CPU's float32 (the float parts run in float16 on the GPU;
    the integer-only model's arithmetic is the CPU's bit for bit, its score within rounding); both
    rows stay in eval.json.  A fallback to the CPU (the OUT refused by the kernels) fails here."""
    out, text = tmp_path / scheme, tmp_path / "t.raw"
    text.write_text(TEXT * 4)
    # groups of 32: the tiny model's K = 64 holds no group of 128, which the W4A8 kernels need whole
    assert quantize_tiny(tiny_calib_src, out, scheme, *(["-g", "32"] if scheme == "is-w4a8-rtn" else [])).exit_code == 0
    args = ["eval", out, "--data-file", text, "--seqlen", 32, "--max-windows", 4, "--json", "-q"]
    gpu = json.loads(run_cli(*args).stdout)
    cpu = json.loads(run_cli(*args, "--device", "cpu").stdout)
    assert (gpu["device"], cpu["device"]) == ("cuda", "cpu") and gpu["device_name"]
    assert gpu["dtype"] == ("integer-only" if scheme.startswith("illm") else "float16")
    assert gpu["scored_tokens"] == cpu["scored_tokens"] == 4 * 31
    tol = 1e-5 if scheme.startswith("illm") else 1e-2
    assert math.isclose(gpu["perplexity"], cpu["perplexity"], rel_tol=tol), (gpu["perplexity"], cpu["perplexity"])
    rows = json.loads((out / "eval.json").read_text())
    assert sorted(r["device"] for r in rows) == ["cpu", "cuda"]


def test_lm_eval_batched_on_the_gpu(tiny_calib_src, tmp_path, task_dir):
    """lm-eval at --batch-size 3 on the GPU (only where lm-eval is installed: the GPU image has none)."""
    pytest.importorskip("lm_eval")
    out = tmp_path / "is"
    assert quantize_tiny(tiny_calib_src, out, "is-w4a8-rtn", "-g", "32").exit_code == 0
    res = run_cli("eval", out, "--tasks", "qconvert_tiny", "--include-path", task_dir, "--batch-size", 3, "--json")
    record = json.loads(res.stdout[res.stdout.index("{"):])
    assert (record["device"], record["dtype"], record["batch_size"]) == ("cuda", "float16", 3)
    assert 0.0 <= record["results"]["qconvert_tiny"]["acc,none"] <= 1.0
