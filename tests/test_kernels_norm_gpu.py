"""The RMSNorm kernel on a GPU against its reference, bit for bit, and a GPU load's norms on it
(needs cupy and an sm_80+ GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert_kernels.w4a8 import cuda as kcuda  # noqa: E402
from qconvert_kernels.norm import cuda as kn  # noqa: E402
from qconvert_kernels.norm import reference as ref  # noqa: E402
from test_kernels_norm import norm_case  # noqa: E402

if not kcuda.available():
    pytest.skip("no CUDA device usable by cupy (sm_80+)", allow_module_level=True)

DEV = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 1), (5, 257), (16, 4096), (7, 14336), (3, 4099)])
def test_rms_norm(rows, n, dtype):
    x, w = norm_case(rows, n, dtype)
    got = kn.rms_norm(x.to(DEV), w.to(DEV), 1e-5).cpu()
    want = ref.rms_norm(x, w, 1e-5)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_a_gpu_load_runs_its_norms_on_the_kernel(tiny_rtn_out, monkeypatch):
    from helpers import gpu_load_kernel_calls

    norms, calls, got, want = gpu_load_kernel_calls(tiny_rtn_out, monkeypatch, kn, "rms_norm", "LlamaRMSNorm",
                                                    "norm_kernel_device", "norm_kernels")
    assert len(calls) == len(norms)  # every norm on the kernel, none on transformers' forward
    x, w, eps = calls[-1]
    assert torch.equal(kn.rms_norm(x, w, eps).cpu(), ref.rms_norm(x.cpu(), w.cpu(), eps))
    got, want = got.float(), want.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_a_launch_on_a_side_stream_runs_there_and_does_not_warn():
    """The launcher runs on torch's current stream, whichever it is (launch.cupy_stream, made once
    per stream), and CuPy 14's ExternalStream deprecation is not hit.  The side stream sleeps
    before the kernel while the default stream zeroes the input: a kernel on the side stream reads
    the zeros, one run elsewhere would have read the values."""
    import warnings

    x, w = norm_case(64, 4096, torch.float16)
    x, w = x.to(DEV), w.to(DEV)
    zeros = kn.rms_norm(torch.zeros_like(x), w, 1e-5)
    assert not torch.equal(kn.rms_norm(x, w, 1e-5), zeros)
    side = torch.cuda.Stream()
    for _ in range(2):  # the second launch on the stream reuses its CuPy object
        xs = x.clone()
        side.wait_stream(torch.cuda.current_stream())
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            with torch.cuda.stream(side):
                torch.cuda._sleep(100_000_000)  # tens of milliseconds
                got = kn.rms_norm(xs, w, 1e-5)
        xs.zero_()  # on the default stream, at once
        torch.cuda.synchronize()
        assert torch.equal(got, zeros)
