import os
import sys
from pathlib import Path

# One float path per CPU vendor on x86-64: torch's and MKL's kernels as on AVX2, even where the CPU
# has AVX-512 (MKL still picks its kernels by vendor: tests/helpers.py, GOLDEN_VENDOR).  The calibrated golden files (QUIK's outlier channels, I-LLM's smoothing) hash tensors
# that float forward passes decide; AVX-512 kernels sum in another order and change them.  oneDNN
# stays free: capped at AVX2 its int8 GEMM (torch._int_mm) saturates at the extremes that
# tests/test_illm.py checks.  Set before torch is imported; a value set outside wins.
for _var, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2")):
    os.environ.setdefault(_var, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
torch.set_grad_enabled(False)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKI_TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # tests never reach the Hub: a download attempt would hang on this network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def wiki_test() -> Path:
    if not WIKI_TEST.is_file():
        pytest.fail(f"{WIKI_TEST} is missing: the tests read WikiText-2 from ../shared/data")
    return WIKI_TEST


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from helpers import tiny_config, write_model

    return write_model(tmp_path_factory.mktemp("tiny") / "llama", tiny_config())


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct GGUF source, read once per session."""
    from qconvert.source import resolve_source

    return resolve_source("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_rtn_out(tiny_llama, tmp_path_factory):
    """A real OUT of the tiny Llama (is-w4a8-rtn, no calibration), made through the CLI."""
    from helpers import tiny_out

    return tiny_out(tiny_llama, tmp_path_factory, "is-w4a8-rtn")


@pytest.fixture(scope="module")
def tiny_calib_src(tmp_path_factory):
    """A tiny 2-layer Llama with calibration text beside it (``calib.txt``)."""
    from helpers import TEXT, tiny_config, write_model

    d = tmp_path_factory.mktemp("calib-src")
    src = write_model(d / "src", tiny_config(layers=2))
    (d / "calib.txt").write_text(TEXT)
    return src


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="K/N",
                     help="run only the K-th of N round-robin slices of the collected tests (1 <= K <= N); "
                          "benchmarks/gpu_check.sh spreads its slowest GPU test files over N processes")


def _shard(value: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard {value!r}: give K/N, e.g. --shard 2/3") from None
    if not 1 <= k <= n:
        raise pytest.UsageError(f"--shard {value!r}: K must be between 1 and N, e.g. --shard 2/3")
    return k, n


def pytest_collection_modifyitems(config, items):
    value = config.getoption("--shard")
    if value is None:
        return
    k, n = _shard(value)
    keep, drop = [], []
    for i, item in enumerate(items):
        (keep if i % n == k - 1 else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
