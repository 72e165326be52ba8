"""The online Hadamard kernel (hadamard.cu) on a GPU against its torch reference, bit for bit, and
a quantized model with ``--rotate hadamard+online`` loaded on the GPU (needs cupy and an sm_80+
GPU; tests/test_online_hadamard.py proves the same kernel on the CPU through its emulator)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert.online_hadamard import OnlineHadamard  # noqa: E402
from qconvert_kernels import launch  # noqa: E402
from qconvert_kernels.hadamard import reference  # noqa: E402

if not launch.available(80):
    pytest.skip("no CUDA device of compute capability 8.0+ usable by cupy", allow_module_level=True)


@pytest.mark.parametrize("n,rows", [(1536, 3), (14336, 5), (11008, 2), (4096, 33), (160, 1), (28672, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_equals_reference(n, rows, dtype):
    t = OnlineHadamard(n)
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(rows, n, generator=gen) * 4).to(dtype)
    want = reference.transform(x, t.sign, t.lp, t.scale)
    got = t(x.cuda()).cpu()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_captured_in_a_cuda_graph():
    t = OnlineHadamard(1536)
    x = torch.randn(4, 1536, device="cuda", dtype=torch.float16)
    t(x)  # compiled and the shared memory opted in before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = t(x)
    x.copy_(torch.randn(4, 1536, dtype=torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    want = reference.transform(x.cpu(), t.sign, t.lp, t.scale)
    assert torch.equal(y.cpu().view(torch.int16), want.view(torch.int16))
