"""The I-LLM CUDA kernels against the integer reference, bit for bit (needs cupy and an sm_80+ GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert_kernels.w4a8 import cuda as kcuda  # noqa: E402
from qconvert_kernels.illm import cuda as cuda_illm  # noqa: E402
from qconvert_kernels.illm import reference as ri  # noqa: E402
from test_kernels_quik_emulate import illm_case  # noqa: E402

if not kcuda.available():
    pytest.skip("no CUDA device usable by cupy (sm_80+)", allow_module_level=True)

DEV = torch.device("cuda")


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("m,n,k", [(1, 576, 576), (17, 1536, 576), (130, 576, 1536), (64, 13, 96)])
def test_matmul(m, n, k, w_bits):
    xq, qw, wm, wk, want = illm_case(m, n, k, w_bits)
    got = cuda_illm.illm_matmul(xq.to(DEV), qw.to(DEV), wm.to(DEV), wk.to(DEV), w_bits).cpu()
    assert torch.equal(got, want)


@pytest.mark.parametrize("clip", [ri.CLIP_ONE, ri.clip_int(0.9)])
@pytest.mark.parametrize("qmax", [127, 7])
def test_requant_rows(qmax, clip):
    gen = torch.Generator().manual_seed(qmax)
    v = torch.randint(-2**50, 2**50, (33, 700), generator=gen)
    v[1] = 0
    v[2] //= 2**40  # a small row
    q, sm, sk = cuda_illm.requant_rows(v.to(DEV), qmax, clip)
    rq, r = ri.quantize_rows(v, qmax, clip)
    assert torch.equal(q.cpu().long(), rq) and torch.equal(sm.cpu(), r.m[:, 0]) and torch.equal(sk.cpu(), r.k[:, 0])


@pytest.mark.parametrize("t", [1, 37, 512])
def test_softmax_causal(t):
    gen = torch.Generator().manual_seed(t)
    scores = torch.randint(-2**20, 2**20, (t, t), generator=gen, dtype=torch.int32)
    scale = ri.normalize(torch.randint(2**15, 2**16, (t, 1), generator=gen), torch.randint(20, 34, (t, 1), generator=gen))
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    ref = ri.di_softmax(scores.long(), scale, mask)
    got = cuda_illm.softmax(scores.to(DEV), torch.arange(1, t + 1, dtype=torch.int32, device=DEV),
                            scale.m[:, 0].to(DEV), scale.k[:, 0].to(DEV)).cpu()
    assert torch.equal(got.long(), ref)


@pytest.mark.parametrize("clip", [ri.CLIP_ONE, ri.clip_int(0.9)])
@pytest.mark.parametrize("qmax", [127, 7])
def test_rmsnorm(qmax, clip):
    gen = torch.Generator().manual_seed(qmax)
    x = torch.randint(-2**21, 2**21, (40, 576), generator=gen)
    x[3] = 0
    g = torch.randint(-2**15, 2**15, (576,), generator=gen)
    q, sm, sk = cuda_illm.rmsnorm(x.to(DEV), g.to(DEV), 14, qmax, clip)
    rq, r = ri.di_rmsnorm(x, g, 14, qmax, clip)
    assert torch.equal(q.cpu().long(), rq) and torch.equal(sm.cpu(), r.m[:, 0]) and torch.equal(sk.cpu(), r.k[:, 0])
