"""The I-LLM CUDA kernels against the integer reference, bit for bit (needs cupy and an sm_80+ GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert_kernels.w4a8 import cuda as kcuda  # noqa: E402
from qconvert_kernels.illm import cuda as cuda_illm  # noqa: E402
from qconvert_kernels.illm import reference as ri  # noqa: E402
from test_kernels_illm_emulate import attention_case, check_joined, joined_case, matmul_like, row_scales  # noqa: E402
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
    xk = torch.arange(m, dtype=torch.int64) - 20  # the rows' exponents written too: t the same
    got, tk = cuda_illm.illm_matmul(xq.to(DEV), qw.to(DEV), wm.to(DEV), wk.to(DEV), w_bits, xk=xk.to(DEV))
    assert torch.equal(got.cpu(), want) and torch.equal(tk.cpu(), xk + wk.min())


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("m,splits", [(1, (4096, 1024, 1024)), (16, (14336, 14336)), (130, (576, 192, 192)),
                                      (3, (40, 24, 72))])
def test_joined_matmul(m, splits, w_bits):
    """Llama-3-8B's q/k/v and gate/up, SmolLM2's q/k/v and odd segments, each joined into one launch:
    every segment's t and row exponents are its own linear's."""
    k = 4096 if splits[0] >= 4096 else 576 if splits[0] == 576 else 96
    xq, qw, wm, wk, xk, wants, tks = joined_case(m, splits, w_bits, k)
    t, tk = cuda_illm.illm_matmul(xq.to(DEV), qw.to(DEV), wm.to(DEV), wk.to(DEV), w_bits, xk=xk.to(DEV), splits=splits)
    check_joined(t.cpu(), tk.cpu(), splits, wants, tks)


@pytest.mark.parametrize("kernel", ["gemv", "tile"])
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("m,splits,k", [(1, (4096, 1024, 1024), 4096), (8, (14336, 14336), 4096), (5, (4096,), 14336),
                                        (3, (40, 24, 72), 96)])
def test_decode_gemv_and_tile_give_the_same_bits(m, splits, k, w_bits, kernel):
    """DI-MatMul at M <= 8 (the GEMV by default, w8 and w4): Llama-3-8B's joined q/k/v and gate/up,
    down_proj, odd segments; both kernels equal the reference."""
    xq, qw, wm, wk, xk, wants, tks = joined_case(m, splits, w_bits, k)
    t, tk = cuda_illm.illm_matmul(xq.to(DEV), qw.to(DEV), wm.to(DEV), wk.to(DEV), w_bits, xk=xk.to(DEV), splits=splits,
                                  kernel=kernel)
    check_joined(t.cpu(), tk.cpu(), splits, wants, tks)


@pytest.mark.parametrize("kernel", ["int_mm", "tile"])
@pytest.mark.parametrize("m,splits,k", [(130, (4096, 1024, 1024), 4096), (17, (14336, 14336), 4096), (256, (4096,), 14336),
                                        (9, (40, 13, 72), 96)])
def test_prefill_int_mm_and_tile_give_the_same_bits(m, splits, k, kernel):
    """DI-MatMul w8 above the GEMV's rows: torch._int_mm (cuBLASLt's int8 GEMM, the default) with
    illm_dyadic_rows, and the tile kernel, on Llama-3-8B's joined q/k/v, gate/up and down_proj and
    odd segments (N = 125: the GEMM's output padded to 128 columns): the reference's bits."""
    xq, qw, wm, wk, xk, wants, tks = joined_case(m, splits, 8, k)
    assert cuda_illm.default_matmul(m, sum(splits), 8) == ("int_mm" if sum(splits) % 8 == 0 else "tile")
    t, tk = cuda_illm.illm_matmul(xq.to(DEV), qw.to(DEV), wm.to(DEV), wk.to(DEV), 8, xk=xk.to(DEV), splits=splits,
                                  kernel=kernel)
    check_joined(t.cpu(), tk.cpu(), splits, wants, tks)


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
    fs = [row_scales(33, 20 + f, 5, 45) for f in range(3)]  # three scales folded in, in turn
    q, sm, sk = cuda_illm.requant_rows(v.to(DEV), qmax, clip, torch.stack([f.m[:, 0] for f in fs]).to(DEV),
                                       torch.stack([f.k[:, 0] for f in fs]).to(DEV))
    for f in fs:
        r = r * f
    assert torch.equal(q.cpu().long(), rq) and torch.equal(sm.cpu(), r.m[:, 0]) and torch.equal(sk.cpu(), r.k[:, 0])
    c = ri.normalize(torch.tensor(35030), torch.tensor(22))  # ~ 1 / sqrt(14336): a constant fold last
    q, sm, sk = cuda_illm.requant_rows(v.to(DEV), qmax, clip, torch.stack([f.m[:, 0] for f in fs]).to(DEV),
                                       torch.stack([f.k[:, 0] for f in fs]).to(DEV), c.m.to(DEV), c.k.to(DEV))
    r = r * c
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


def _rows(d):
    return d.m[:, 0].to(DEV), d.k[:, 0].to(DEV)


@pytest.mark.parametrize("heads,d,per_head,rope,fold", [(32, 128, False, True, False), (8, 128, True, True, True),
                                                      (8, 128, True, False, True), (9, 64, True, True, True)])
@pytest.mark.parametrize("sliced", [False, True])
def test_rope_requant(heads, d, per_head, rope, fold, sliced):
    """Llama-3-8B's q (per token, RoPE, the out fold), k (per head, RoPE, fold), v (no RoPE), and
    SmolLM2's k, at positions up to 8191; ``sliced``: read in place from the columns of a wider
    tensor, as from a joined q/k/v DI-MatMul."""
    rows = 40
    t = matmul_like(rows, heads * d, heads)
    t[5, 3] = 2**60  # a row above 2^40: the pre-shift
    cos, sin = ri.rope_table(8192, d, 500000.0)
    pos = torch.randint(0, 8192, (rows,), generator=torch.Generator().manual_seed(d))
    f, o = row_scales(rows, 9), row_scales(rows, 10)
    tables = (pos.to(DEV), cos.to(DEV), sin.to(DEV)) if rope else (None,) * 3
    td = t.to(DEV)
    if sliced:
        wide = torch.zeros(rows, 1024 + heads * d + 512, dtype=torch.int64, device=DEV) - 2**40
        wide[:, 1024:1024 + heads * d] = td
        td = wide[:, 1024:1024 + heads * d]
    q, sm, sk = cuda_illm.rope_requant(td, d, 127, per_head, *tables, *(_rows(f) if fold else (None, None)),
                                       *(_rows(o) if not fold else (None, None)))
    wq, ws = ri.rope_requant(t, d, 127, per_head, *((cos[pos], sin[pos]) if rope else (None, None)),
                             f if fold else None, o if not fold else None)
    assert torch.equal(q.cpu().long(), wq) and torch.equal(sm.cpu(), ws.m[..., 0]) and torch.equal(sk.cpu(), ws.k[..., 0])


def test_rope_requant_into_a_cache():
    """Llama-3-8B's keys of a batch-16 decode step written into a static cache at column 300 of 512:
    the reference's keys and scales there, nothing else changed."""
    rows, heads, d, max_len, column = 16, 8, 128, 512, 300
    t = matmul_like(rows, heads * d, 11)
    cos, sin = ri.rope_table(1024, d, 500000.0)
    pos = torch.arange(rows) * 37
    f = row_scales(rows, 12)
    kb = torch.randint(-127, 128, (rows, heads, max_len, d), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    mb, eb = torch.ones(rows, heads, max_len, 1, dtype=torch.int64), torch.zeros(rows, heads, max_len, 1, dtype=torch.int64)
    before = [x.clone() for x in (kb, mb, eb)]
    bufs = [x.to(DEV) for x in (kb, mb, eb)]
    cuda_illm.rope_requant(t.to(DEV), d, 127, True, pos.to(DEV), cos.to(DEV), sin.to(DEV), *_rows(f),
                           into=(*bufs, torch.tensor([column], device=DEV)))
    wq, ws = ri.rope_requant(t, d, 127, True, cos[pos], sin[pos], f)
    got = [x.cpu() for x in bufs]
    assert torch.equal(got[0][:, :, column].reshape(rows, -1).long(), wq)
    assert torch.equal(got[1][:, :, column, 0], ws.m[..., 0]) and torch.equal(got[2][:, :, column, 0], ws.k[..., 0])
    for now, was in zip(got, before):
        now[:, :, column] = was[:, :, column] = 0
        assert torch.equal(now, was)


@pytest.mark.parametrize("rows,heads,t,d", [(16, 32, 1, 128), (2, 9, 37, 64)])
def test_heads_requant(rows, heads, t, d):
    """Llama-3-8B's decode batch of 16 and SmolLM2's prefill: heads on one exponent per token, a zero
    head in every token, int8 for o_proj with the preset's clip."""
    gen = torch.Generator().manual_seed(heads)
    o = torch.randint(-2**45, 2**45, (rows, heads, t, d), generator=gen)
    e = torch.randint(-8, 40, (rows, heads, t), generator=gen)
    e[:, 1], o[:, 1] = ri.NO_EXPONENT, 0
    q, sm, sk = cuda_illm.heads_requant(o.to(DEV), e.to(DEV), 127, ri.clip_int(0.9))
    wq, ws = ri.heads_requant(o, e[..., None], 127, ri.clip_int(0.9))
    assert torch.equal(q.cpu().long(), wq) and torch.equal(sm.cpu(), ws.m[:, 0]) and torch.equal(sk.cpu(), ws.k[:, 0])


@pytest.mark.parametrize("n,joined", [(1536, False), (14336, False), (5, False), (14336, True), (5, True)])
def test_swiglu(n, joined):
    """SmolLM2's and Llama-3-8B's widths and an odd one; ``joined``: gate and up as the two column
    halves of one tensor, as the joined gate/up DI-MatMul leaves them."""
    tg, tu = matmul_like(33, n, 1), matmul_like(33, n, 2)
    sg, su = row_scales(33, 3, 10, 30), row_scales(33, 4, 10, 30)
    dg, du = tg.to(DEV), tu.to(DEV)
    if joined:
        both = torch.cat([dg, du], 1)
        dg, du = both[:, :n], both[:, n:]
    a, gm, gk, um, uk = cuda_illm.swiglu(dg, *_rows(sg), du, *_rows(su))
    a2, fm, fk = cuda_illm.swiglu(dg, *_rows(sg), du, *_rows(su), folds=True)  # the scales as [2, rows]
    assert torch.equal(a2, a) and torch.equal(fm, torch.stack([gm, um])) and torch.equal(fk, torch.stack([gk, uk]))
    wa, wg, wu = ri.swiglu(tg, sg, tu, su)
    assert torch.equal(a.cpu(), wa)
    assert torch.equal(gm.cpu(), wg.m[:, 0]) and torch.equal(gk.cpu(), wg.k[:, 0])
    assert torch.equal(um.cpu(), wu.m[:, 0]) and torch.equal(uk.cpu(), wu.k[:, 0])


@pytest.mark.parametrize("n", [576, 4096, 7])
def test_residual_add_and_norm(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-2**20 + 1, 2**20, (40, n), generator=gen)
    b = matmul_like(40, n, 6)
    sx, sb = row_scales(40, 7), row_scales(40, 8)
    sx.m[5], sx.k[5] = 0, 0
    sx.k[6], sx.k[7], sx.k[8] = sb.k[6] - 50, sb.k[7] + 120, sb.k[8] - 120  # far apart: shifts clamped at 62
    g = torch.randint(-2**15, 2**15, (n,), generator=gen)
    h, hm, hk, q, qm, qk = cuda_illm.residual_norm(x.to(DEV), *_rows(sx), b.to(DEV), *_rows(sb), g.to(DEV), 14, 127,
                                                   ri.clip_int(0.9))
    wh, ws = ri.residual_add(x, sx, b, sb)
    assert torch.equal(h.cpu(), wh) and torch.equal(hm.cpu(), ws.m[:, 0]) and torch.equal(hk.cpu(), ws.k[:, 0])
    wq, wqs = ri.di_rmsnorm(wh, g, 14, 127, ri.clip_int(0.9))
    assert torch.equal(q.cpu().long(), wq) and torch.equal(qm.cpu(), wqs.m[:, 0]) and torch.equal(qk.cpu(), wqs.k[:, 0])


@pytest.mark.parametrize("case", [{"hr": 48, "group": 4, "n": 700, "d": 128}, {"t": 5}, {"d": 24, "n": 9, "group": 1},
                                  {"hr": 1, "group": 9, "n": 2048}])
def test_attention(case):
    q, sq, k8, sk, v8, sv, mask = attention_case(**case)
    isd = ri.normalize(torch.tensor(46341), torch.tensor(18))
    hr, group, t, d = q.shape
    o, e = cuda_illm.attention(q.to(DEV), sq.m.reshape(hr, t).to(DEV), sq.k.reshape(hr, t).to(DEV), k8.to(DEV),
                               *(x.to(DEV) for x in (sk.m, sk.k)), v8.to(DEV), *(x.to(DEV) for x in (sv.m, sv.k)),
                               mask.to(DEV), (int(isd.m), int(isd.k)))
    wo, we = ri.attention(q, sq, k8, sk, v8, sv, mask, isd)
    assert torch.equal(o.cpu(), wo) and torch.equal(e.cpu(), we[..., 0])


@pytest.mark.parametrize("n", [1536, 14336, 4096, 160])
def test_hadamard(n):
    from qconvert.online_hadamard import OnlineHadamard

    online = OnlineHadamard(n)
    x = torch.randint(-2**30, 2**30, (17, n), generator=torch.Generator().manual_seed(n))
    y = cuda_illm.hadamard(x.to(DEV), online.sign.to(DEV), online.lp)
    assert torch.equal(y.cpu(), ri.hadamard_rows(x, online.sign.long(), online.lp))
