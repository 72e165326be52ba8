"""The I-LLM row kernels of illm_gemm.cu (requantizations, DI-ClippedSoftmax, DI-Norm, SwiGLU, the
residual add with the DI-Norm after it) and DI-MatMul proven on the CPU: the real launchers run with their launches routed to the emulator
(illm/emulate.py: the kernels' scalar integer code with common.cuh's divisions, every int64
intermediate and DivBy numerator checked against its bound) and must equal
``qconvert_kernels.illm.reference`` bit for bit.  tests/test_kernels_illm_gpu.py runs the same
kernels on a GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import assert_mutation_caught, macro_params
from test_kernels_quik_emulate import illm_case

from qconvert_kernels.illm import cuda as cuda_illm
from qconvert_kernels.illm import emulate
from qconvert_kernels.illm import reference as ri


def requant_case(qmax):
    gen = torch.Generator().manual_seed(qmax)
    v = torch.randint(-2**50, 2**50, (7, 300), generator=gen)
    v[1] = 0  # an all-zero row
    v[2] //= 2**40  # a small row: no pre-shift
    v[3, 5] = -2**50  # amax from a negative value
    return v


CLIPS = [ri.CLIP_ONE, ri.clip_int(0.9), ri.CLIP_ONE // 2, ri.clip_int(2 / 3)]  # none, the preset's, the least, odd


def run_requant(qmax, clip=ri.CLIP_ONE, mutations=frozenset(), folds=0, const=False):
    """The int8 requantization, its scale times ``folds`` per-row dyadics and, with ``const``, one
    constant dyadic last (the online transform's 1 / sqrt(n) of SmolLM2's 1,536)."""
    v = requant_case(qmax)
    fs = [row_scales(v.shape[0], 10 + f, 5, 45) for f in range(folds)]
    fm = torch.stack([f.m[:, 0] for f in fs]) if folds else None
    fk = torch.stack([f.k[:, 0] for f in fs]) if folds else None
    c = ri.normalize(torch.tensor(53510), torch.tensor(21)) if const else None  # ~ 1 / sqrt(1536)
    with emulate.emulating(mutations=mutations):
        q, sm, sk = cuda_illm.requant_rows(v, qmax, clip, fm, fk, *((c.m, c.k) if const else ()))
    rq, r = ri.quantize_rows(v, qmax, clip)
    for f in fs + ([c] if const else []):
        r = r * f
    assert torch.equal(q.long(), rq), "q differs"
    assert torch.equal(sm, r.m[:, 0]) and torch.equal(sk, r.k[:, 0]), "scale differs"


def run_softmax(t, mutations=frozenset(), valid=None):
    gen = torch.Generator().manual_seed(t)
    scores = torch.randint(-2**20, 2**20, (t, t), generator=gen, dtype=torch.int32)
    scale = ri.normalize(torch.randint(2**15, 2**16, (t, 1), generator=gen), torch.randint(20, 34, (t, 1), generator=gen))
    valid = torch.arange(1, t + 1, dtype=torch.int32) if valid is None else valid
    with emulate.emulating(mutations=mutations):
        got = cuda_illm.softmax(scores, valid, scale.m[:, 0], scale.k[:, 0])
    mask = torch.arange(t)[None, :] < valid.clamp(0, t).long()[:, None]
    want = ri.di_softmax(scores.long(), scale, mask)
    assert torch.equal(got.long(), want), f"P differs in {(got.long() != want).sum()} places"


def run_rmsnorm(qmax, clip=ri.CLIP_ONE, mutations=frozenset()):
    gen = torch.Generator().manual_seed(qmax)
    x = torch.randint(-2**21, 2**21, (5, 576), generator=gen)
    x[3] = 0
    g = torch.randint(-2**15, 2**15, (576,), generator=gen)
    with emulate.emulating(mutations=mutations):
        q, sm, sk = cuda_illm.rmsnorm(x, g, 14, qmax, clip)
    rq, r = ri.di_rmsnorm(x, g, 14, qmax, clip)
    assert torch.equal(q.long(), rq), "q differs"
    assert torch.equal(sm, r.m[:, 0]) and torch.equal(sk, r.k[:, 0]), "scale differs"


def row_scales(rows: int, seed: int, low: int = 20, high: int = 40):
    """Random per-row dyadic scales [rows, 1] with a zero one (m = 0, k = 0) in row 1."""
    gen = torch.Generator().manual_seed(seed)
    d = ri.normalize(torch.randint(1, 2**16, (rows, 1), generator=gen), torch.randint(low, high, (rows, 1), generator=gen))
    d.m[1], d.k[1] = 0, 0
    return d


def same_scale(m, k, d, what):
    assert torch.equal(m, d.m[:, 0]) and torch.equal(k, d.k[:, 0]), f"{what} scale differs"


def column_slice(t: torch.Tensor, left: int, right: int, seed: int) -> torch.Tensor:
    """t's values as columns of a wider tensor (``left`` and ``right`` columns of other values around
    them, as a joined DI-MatMul's output holds one linear's columns): a view, rows apart by its width."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randint(-2**46, 2**46, (t.shape[0], left + t.shape[1] + right), generator=gen)
    wide[:, left:left + t.shape[1]] = t
    view = wide[:, left:left + t.shape[1]]
    assert not view.is_contiguous() or t.shape[0] <= 1
    return view


def run_rope_requant(heads=3, d=24, per_head=True, rope=True, fold=True, out_fold=False, rows=5, sliced=False,
                     mutations=frozenset()):
    """A token's projection (rows of heads * d, one above 2^40, the last zero) through 16 bits, RoPE
    at positions far apart, and int8 per head or per token, with per-row folds (row 1's zero);
    ``sliced``: read in place from the middle columns of a wider tensor."""
    gen = torch.Generator().manual_seed(heads * d + rows)
    t = torch.randint(-2**36, 2**36, (rows, heads * d), generator=gen)
    t[rows - 1] = 0
    t[0, 3] = 2**45  # the 16-bit requantization's pre-shift
    if sliced:
        t = column_slice(t, 40, 17, rows)
    cos, sin = ri.rope_table(700, d, 10000.0)
    pos = torch.tensor([0, 1, 699, 5, 300, 17, 64][:rows])
    f, o = row_scales(rows, 3), row_scales(rows, 4)
    with emulate.emulating(mutations=mutations) as emu:
        q, sm, sk = cuda_illm.rope_requant(t, d, 127, per_head, *((pos, cos, sin) if rope else (None,) * 3),
                                           *((f.m[:, 0], f.k[:, 0].int()) if fold else (None, None)),
                                           *((o.m[:, 0], o.k[:, 0]) if out_fold else (None, None)))
    wq, ws = ri.rope_requant(t, d, 127, per_head, *((cos[pos], sin[pos]) if rope else (None, None)),
                             f if fold else None, o if out_fold else None)
    assert [name for name, *_ in emu.launches] == ["illm_rope_requant"]
    assert q.dtype == torch.int8 and torch.equal(q.long(), wq), f"q differs in {(q.long() != wq).sum()} places"
    assert sm.shape == (rows, heads if per_head else 1)
    assert torch.equal(sm, ws.m[..., 0]) and torch.equal(sk, ws.k[..., 0]), "scale differs"
    assert (sm[-1] == 0).all() and (q[-1] == 0).all() and (q.abs().amax(1)[:-1] == 127).all()
    assert (sm[1] == 0).all() == (fold or out_fold)  # a zero fold: a zero scale, q as without it


def matmul_like(rows: int, n: int, seed: int) -> torch.Tensor:
    """Rows as DI-MatMul writes them (int32 sums times 16-bit mantissas, up to 2^47), with an all-zero
    row (2), a row of small values (3) and one mixed row of both signs' extremes (4)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(-2**47, 2**47, (rows, n), generator=gen)
    t[2] = 0
    t[3] //= 2**40
    t[4, ::2] = -2**47
    return t


def run_swiglu(n=300, joined=False, mutations=frozenset()):
    """SwiGLU of gate and up rows (``joined``: both column slices of one [6, 2n] tensor, read in place
    as the joined gate/up DI-MatMul leaves them)."""
    tg, tu = matmul_like(6, n, 1), matmul_like(6, n, 2)
    tu[5] = 0  # up all zero where the gate is not
    if joined:
        both = torch.cat([tg, tu], 1)
        tg, tu = both[:, :n], both[:, n:]
    sg, su = row_scales(6, 3, 10, 30), row_scales(6, 4, 10, 30)
    sg.m[4], sg.k[4] = 2**15, 12  # a gate scale above 2^-16: DI-Exp's capped left shift
    sg.k[0] = 120  # a gate scale far below 2^-64: DI-Exp's right shift clamped at 62 (e^-0 = 1)
    with emulate.emulating(mutations=mutations):
        a, gm, gk, um, uk = cuda_illm.swiglu(tg, sg.m[:, 0], sg.k[:, 0], tu, su.m[:, 0], su.k[:, 0])
    wa, wg, wu = ri.swiglu(tg, sg, tu, su)
    assert torch.equal(a, wa), f"a differs in {(a != wa).sum()} places"
    same_scale(gm, gk, wg, "gate")
    same_scale(um, uk, wu, "up")


def run_residual(mutations=frozenset(), clip=ri.CLIP_ONE, qmax=127):
    """The residual add and the DI-Norm of its sum in one launch (illm_residual_norm)."""
    gen = torch.Generator().manual_seed(5)
    rows, n = 7, 576
    x = torch.randint(-2**20 + 1, 2**20, (rows, n), generator=gen)
    x[0] = 0  # a zero residual row with a real scale
    b = matmul_like(rows, n, 6)
    sx, sb = row_scales(rows, 7), row_scales(rows, 8)
    sx.m[5], sx.k[5] = 0, 0  # a zero residual scale (and row 1's branch scale is zero too)
    sx.k[6] = sb.k[6] - 50  # the branch far below the residual: its shift leaves (almost) nothing
    sx.k[3] = sb.k[3] + 120  # the residual 2^-90 or so below the branch: its shift clamped at 62, 0
    sx.k[4] = sb.k[4] - 120  # and the branch as far below the residual
    g = torch.randint(-2**15, 2**15, (n,), generator=gen)
    with emulate.emulating(mutations=mutations):
        h, hm, hk, q, qm, qk = cuda_illm.residual_norm(x, sx.m[:, 0], sx.k[:, 0], b, sb.m[:, 0], sb.k[:, 0], g, 14, qmax, clip)
    wh, ws = ri.residual_add(x, sx, b, sb)
    assert torch.equal(h, wh), f"h differs in {(h != wh).sum()} places"
    same_scale(hm, hk, ws, "h")
    wq, wqs = ri.di_rmsnorm(wh, g, 14, qmax, clip)
    assert torch.equal(q.long(), wq), f"the norm's q differs in {(q.long() != wq).sum()} places"
    same_scale(qm, qk, wqs, "the norm's")


def attention_case(hr=4, group=3, t=1, n=37, d=64, per_head_mask=True, seed=0, negative=False):
    """Inputs of reference.attention as the model makes them: int8 queries, keys and values, a scale
    per query row and per key / value column (some zero), a causal mask with left padding per
    head-row (or one mask for all)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (hr, group, t, d), generator=gen, dtype=torch.int8)
    k8 = torch.randint(-127, 128, (hr, n, d), generator=gen, dtype=torch.int8)
    v8 = torch.randint(-127, 128, (hr, n, d), generator=gen, dtype=torch.int8)
    if negative:  # every score below 0 but the zero-scale key's: that 0 is the row's max
        q, k8 = q.abs().clamp_min(1), -k8.abs().clamp_min(1)

    def scales(shape, low, high):
        return ri.normalize(torch.randint(1, 2**16, shape, generator=gen), torch.randint(low, high, shape, generator=gen))

    sq = scales((hr, 1, t, 1), 20, 40)
    sk, sv = scales((hr, n), 10, 30), scales((hr, n), 10, 30)
    sk.m[0, 3], sk.k[0, 3] = 0, 0  # a zero key scale (its score is 0, it still takes part)
    if hr > 1:
        sv.m[1, :], sv.k[1, :] = 0, 0  # a head-row whose values are all zero: P V is 0, e NO_EXPONENT
    cols = torch.arange(n)
    causal = cols[None, :] <= (n - t + torch.arange(t))[:, None]  # [t, n]
    if per_head_mask:
        pad = torch.tensor([0, 5, 0, n - t] + [1] * (hr - 4))[:hr]  # head-row 3 sees only its own tokens
        mask = causal[None] & (cols[None, None, :] >= pad[:, None, None])
        if hr > 2:
            sk.k[2, 0], pad[2] = -30, 1  # a padding column whose exponent is far below every seen one's
            mask = causal[None] & (cols[None, None, :] >= pad[:, None, None])
    else:
        mask = causal[None]
    return q, sq, k8, sk, v8, sv, mask


def run_attention(mutations=frozenset(), qdiv=1, uint8_mask=False, **case):
    """``qdiv`` > 1: the query's scale given once per qdiv head-rows (as the model gives it: one per
    sequence, read by its KV heads' head-rows); ``uint8_mask``: the mask as the model makes it."""
    q, sq, k8, sk, v8, sv, mask = attention_case(**case)
    isd = ri.normalize(torch.tensor(46341), torch.tensor(18))  # about 1 / sqrt(64)
    hr, group, t, d = q.shape
    if qdiv > 1:  # one scale per qdiv head-rows: the first's, for all of them
        sq = ri.Dyadic(*(x[::qdiv].repeat_interleave(qdiv, 0) for x in (sq.m, sq.k)))
    with emulate.emulating(mutations=mutations) as emu:
        o, e = cuda_illm.attention(q, sq.m[::qdiv].reshape(hr // qdiv, t), sq.k[::qdiv].reshape(hr // qdiv, t), k8, sk.m,
                                   sk.k, v8, sv.m, sv.k, mask.to(torch.uint8) if uint8_mask else mask,
                                   (int(isd.m), int(isd.k)), qdiv=qdiv)
    wo, we = ri.attention(q, sq, k8, sk, v8, sv, mask, isd)
    assert [name for name, *_ in emu.launches] == ["illm_attention"]
    assert torch.equal(e, we[..., 0]), "e differs"
    assert torch.equal(o, wo), f"o differs in {(o != wo).sum()} places"
    return wo, we


@pytest.mark.parametrize("case", [{}, {"t": 5}, {"d": 24, "n": 9, "group": 1}, {"per_head_mask": False, "t": 3},
                                  {"hr": 1, "group": 9, "n": 300}, {"negative": True}, {"t": 3, "n": 4},
                                  {"qdiv": 2, "t": 3, "uint8_mask": True}, {"qdiv": 4, "hr": 8}])
def test_attention_bit_exact(case):
    o, e = run_attention(**case)
    if o.shape[0] > 1:
        assert (e[1] == ri.NO_EXPONENT).all() and (o[1] == 0).all()  # the all-zero values' head-row
    assert (e != ri.NO_EXPONENT).any() and o.abs().max() > 0


def run_hadamard(n=48, mutations=frozenset()):
    from qconvert.online_hadamard import OnlineHadamard

    online = OnlineHadamard(n)
    sign, lp = online.sign, online.lp
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-2**30, 2**30, (4, n), generator=gen)
    x[1] = 0
    with emulate.emulating(mutations=mutations):
        y = cuda_illm.hadamard(x, sign, lp)
    want = ri.hadamard_rows(x, sign.long(), lp)
    assert torch.equal(y, want), f"y differs in {(y != want).sum()} places"


def run_heads_requant(rows=2, heads=6, t=3, d=24, clip=ri.CLIP_ONE, mutations=frozenset()):
    """Attention's outputs as ``ri.attention`` gives them: exponents far apart (some negative), a
    zero head (NO_EXPONENT) in every token when there are three heads or more, a token whose heads
    are all zero when there are two tokens or more, values up to 2^45."""
    gen = torch.Generator().manual_seed(heads * d + t)
    o = torch.randint(-2**45, 2**45, (rows, heads, t, d), generator=gen)
    e = torch.randint(-8, 40, (rows, heads, t), generator=gen)
    if heads > 2:
        e[:, 1], o[:, 1] = ri.NO_EXPONENT, 0
    zero = rows * t > 1
    if zero:
        e[rows - 1, :, t - 1], o[rows - 1, :, t - 1] = ri.NO_EXPONENT, 0
    with emulate.emulating(mutations=mutations) as emu:
        q, sm, sk = cuda_illm.heads_requant(o, e, 127, clip)
    wq, ws = ri.heads_requant(o, e[..., None], 127, clip)
    assert [name for name, *_ in emu.launches] == ["illm_heads_requant"]
    assert torch.equal(q.long(), wq), f"q differs in {(q.long() != wq).sum()} places"
    same_scale(sm, sk, ws, "the")
    live = sm[:-1] if zero else sm
    assert (live > 0).all() and (not zero or (sm[-1] == 0 and (q[-1] == 0).all()))
    assert len(set(e[0, :, 0].tolist()) - {ri.NO_EXPONENT}) > 1  # heads on different exponents: aligned by shifts


@pytest.mark.parametrize("case", [{}, {"clip": ri.clip_int(0.9)}, {"rows": 1, "heads": 9, "t": 1, "d": 64},
                                  {"rows": 3, "heads": 2, "t": 5, "d": 8}])
def test_heads_requant_bit_exact(case):
    run_heads_requant(**case)


@pytest.mark.parametrize("n", [48, 160, 64, 1536, 12, 24])  # A of order 12, 20 times H_4, H_8; H_64; 12 x 128; 12 x H_1, H_2
def test_hadamard_bit_exact(n):
    run_hadamard(n)


def run_rope_into_cache(mutations=frozenset()):
    """A decode step's keys (one token per row) written by the kernel straight into a static
    cache's buffers (rows 1..3 of 4, as a part of rows takes them) at column 4 of 7: that column
    holds the reference's keys and scales, every other cell what it held."""
    rows, heads, d, max_len, column = 3, 2, 16, 7, 4
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(-2**36, 2**36, (rows, heads * d), generator=gen)
    cos, sin = ri.rope_table(64, d, 10000.0)
    pos = torch.tensor([3, 40, 0])
    f = row_scales(rows, 6)
    kb = torch.randint(-127, 128, (rows + 1, heads, max_len, d), generator=gen, dtype=torch.int8)
    mb, eb = (torch.randint(1, 2**16, (rows + 1, heads, max_len, 1), generator=gen) for _ in range(2))
    before = [x.clone() for x in (kb, mb, eb)]
    with emulate.emulating(mutations=mutations):
        cuda_illm.rope_requant(t, d, 127, True, pos, cos, sin, f.m[:, 0], f.k[:, 0], into=(kb[1:], mb[1:], eb[1:],
                                                                                       torch.tensor([column])))
    wq, ws = ri.rope_requant(t, d, 127, True, cos[pos], sin[pos], f)
    assert torch.equal(kb[1:, :, column].reshape(rows, -1).long(), wq), "k differs at the column"
    assert torch.equal(mb[1:, :, column, 0], ws.m[..., 0]) and torch.equal(eb[1:, :, column, 0], ws.k[..., 0]), "scale differs"
    for now, was in zip((kb, mb, eb), before):
        now[1:, :, column], was[1:, :, column] = 0, 0
        assert torch.equal(now, was), "a cell outside the column differs"


def test_rope_requant_writes_a_decode_step_into_the_cache():
    run_rope_into_cache()
    t = torch.zeros(2, 48, dtype=torch.int64)
    kb, sb = torch.zeros(2, 3, 7, 16, dtype=torch.int8), torch.zeros(2, 3, 7, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="into must be contiguous int8"):  # a copy's writes would be lost
        cuda_illm.rope_requant(t, 16, 127, True, into=(torch.zeros(2, 3, 8, 16, dtype=torch.int8)[:, :, :7], sb, sb,
                                                       torch.tensor([0])))
    with pytest.raises(ValueError, match="the column must be one int64"):
        cuda_illm.rope_requant(t, 16, 127, True, into=(kb, sb, sb, torch.tensor([0, 1])))
    with emulate.emulating(), pytest.raises(emulate.EmulationError, match="column 7 outside the cache's 7"):
        cuda_illm.rope_requant(t, 16, 127, True, into=(kb, sb, sb.clone(), torch.tensor([7])))


@pytest.mark.parametrize("case", [{}, {"per_head": False, "fold": False, "out_fold": True}, {"rope": False}, {"out_fold": True},
                                  {"heads": 1, "d": 64, "rows": 7}, {"heads": 4, "d": 96, "per_head": False, "out_fold": True},
                                  {"heads": 12, "d": 8, "rows": 3}])
def test_rope_requant_bit_exact(case):
    """q (per token, out fold), k (per head, fold), v (no RoPE), both folds: heads of 8 to 96, a
    384-wide row (more than a CTA's 256 threads), positions 0 to 699."""
    run_rope_requant(**case)


@pytest.mark.parametrize("n", [300, 1, 1536])
def test_swiglu_bit_exact(n):
    run_swiglu(n)


@pytest.mark.parametrize("qmax,clip", [(127, ri.CLIP_ONE), (7, ri.clip_int(0.9))])
def test_residual_add_and_norm_bit_exact(qmax, clip):
    run_residual(clip=clip, qmax=qmax)


def test_fused_glue_launchers_validate():
    v = torch.zeros(3, 8, dtype=torch.int64)
    one = torch.ones(3, dtype=torch.int64)
    tab = torch.zeros(10, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="give both fold m and k"):
        cuda_illm.rope_requant(v, 4, 127, True, fm=one)
    with pytest.raises(ValueError, match="0 < qmax <= 127"):
        cuda_illm.rope_requant(v, 4, 128, True)
    with pytest.raises(ValueError, match="head_dim 3 must be even and divide the rows' width 8"):
        cuda_illm.rope_requant(v, 3, 127, True)
    with pytest.raises(ValueError, match="divide the rows' width 0"):
        cuda_illm.rope_requant(v[:, :0], 4, 127, False)
    with pytest.raises(ValueError, match="give pos, cos and sin, or none"):
        cuda_illm.rope_requant(v, 4, 127, True, one, tab)
    with pytest.raises(ValueError, match="cos and sin must be int64 \\[positions, 2\\]"):
        cuda_illm.rope_requant(v, 4, 127, True, one, tab, tab[:, :1])
    with pytest.raises(ValueError, match="qmax <= 2\\^20 - 1"):
        cuda_illm.residual_norm(v, one, one, v, one, one, one.new_ones(8), 0, 127, rqmax=1 << 20)
    with pytest.raises(ValueError, match="e must be int64 \\[rows, heads, t\\] = \\[1, 3, 2\\]"):
        cuda_illm.heads_requant(v.reshape(1, 3, 2, 4), v[:, :2], 127)
    with pytest.raises(ValueError, match="heads x head_dim = 3 x 0 must be in"):
        cuda_illm.heads_requant(v.reshape(1, 3, 8, 1)[..., :0], v.reshape(1, 3, 8), 127)
    with pytest.raises(ValueError, match="b must be int64 \\[rows, n\\] = \\[3, 8\\]"):
        cuda_illm.residual_norm(v, one, one, v[:2], one, one, one.new_ones(8), 0, 127)
    with pytest.raises(ValueError, match="up scale m must be \\[rows\\] = \\[3\\]"):
        cuda_illm.swiglu(v, one, one, v, one[:2], one)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("qmax", [127, 7])
def test_requant_rows_bit_exact(qmax, clip):
    run_requant(qmax, clip=clip)


@pytest.mark.parametrize("folds", [1, 2, 3])
def test_requant_rows_folds_its_scales_in_order(folds):
    """The int8 requantization's scale times one to three per-row dyadics, left to right (as the
    model folds a query's, a key's or the MLP's scale products), with zero scales among them."""
    run_requant(127, ri.clip_int(0.9), folds=folds)


@pytest.mark.parametrize("t", [1, 37, 100])
def test_softmax_causal_bit_exact(t):
    run_softmax(t)


def test_softmax_valid_lengths_outside_the_row():
    """valid[r] < 0 or > T: the kernel clamps it (a row of zeros, or the whole row)."""
    run_softmax(9, valid=torch.tensor([-3, 0, 1, 4, 9, 12, 2, 9, 100], dtype=torch.int32))


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("qmax", [127, 7])
def test_rmsnorm_bit_exact(qmax, clip):
    run_rmsnorm(qmax, clip=clip)


def test_clip_reference_semantics():
    """The clip shrinks each row's range to round(amax * c) and saturates what lies beyond; 2^16
    is bit-identical to no clip; the launchers refuse a clip outside [2^15, 2^16]."""
    v = torch.tensor([[100, -100, 50, 89, 91, 0], [3, -1, 0, 2, 1, 1]])
    q, r = ri.quantize_rows(v, 7, ri.clip_int(0.9))
    assert q.tolist() == [[7, -7, 4, 7, 7, 0], [7, -2, 0, 5, 2, 2]]  # amax' = 90 and 3
    want = ri.ratio(torch.tensor([[90], [3]]), 7)
    assert torch.equal(r.m, want.m) and torch.equal(r.k, want.k)
    plain, d = ri.quantize_rows(v, 7)
    same, e = ri.quantize_rows(v, 7, ri.CLIP_ONE)
    assert torch.equal(plain, same) and torch.equal(d.m, e.m) and torch.equal(d.k, e.k)
    for bad in (ri.CLIP_ONE // 2 - 1, ri.CLIP_ONE + 1, 0.9):
        with pytest.raises(ValueError, match="clip must be an integer"):
            cuda_illm.requant_rows(v, 7, bad)


LAUNCHED = {"gemv": "illm_gemv_w{}", "tile": "illm_matmul_w{}", "int_mm": "illm_dyadic_rows"}


def launched(m: int, n: int, w_bits: int, kernel=None) -> str:
    """The kernel a DI-MatMul of M rows and N columns launches (torch._int_mm runs before illm_dyadic_rows)."""
    return LAUNCHED[kernel or cuda_illm.default_matmul(m, n, w_bits)].format(w_bits)


@pytest.mark.parametrize("kernel", [None, "tile"])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_matmul_through_the_illm_emulator(w_bits, kernel):
    """M = 17: w8 by default on torch._int_mm and illm_dyadic_rows, w4 on the tile kernel; the tile
    kernel when asked; the reference's t."""
    xq, qw, wm, wk, want = illm_case(17, 72, 160, w_bits)
    with emulate.emulating() as emu:
        got = cuda_illm.illm_matmul(xq, qw, wm, wk, w_bits, kernel=kernel)
    assert torch.equal(got, want) and [n for n, *_ in emu.launches] == [launched(17, 72, w_bits, kernel)]
    assert launched(17, 72, w_bits) == ("illm_dyadic_rows" if w_bits == 8 else "illm_matmul_w4")


def run_matmul_exponents(m=130, mutations=frozenset(), kernel=None, n=72):
    """DI-MatMul writing its rows' scale exponents xk + kmin too (tile: every row tile, one column
    tile's CTAs each, N past one tile; int_mm: each row's CTA), t unchanged."""
    xq, qw, wm, wk, want = illm_case(m, n, 96, 8)
    xk = torch.randint(-40, 40, (m,), generator=torch.Generator().manual_seed(m))
    with emulate.emulating(mutations=mutations) as emu:
        got, tk = cuda_illm.illm_matmul(xq, qw, wm, wk, 8, xk=xk, kernel=kernel)
    assert [name for name, *_ in emu.launches] == [launched(m, n, 8, kernel)]
    assert torch.equal(got, want), "t differs"
    assert tk.dtype == torch.int64 and torch.equal(tk, xk + wk.min()), "tk differs"


@pytest.mark.parametrize("kernel", [None, "tile"])
@pytest.mark.parametrize("m", [130, 1])
def test_matmul_writes_its_rows_exponents(m, kernel):
    run_matmul_exponents(m, kernel=kernel)


@pytest.mark.parametrize("m,n,k", [(9, 72, 96), (17, 13, 160), (70, 100, 4096), (130, 576, 576), (16, 8, 32)])
def test_int_mm_matmul_bit_exact(m, n, k):
    """w8 on torch._int_mm (its operands padded as CUDA needs: rows to > 16 and multiples of 8, N to
    a multiple of 8 and at least 16, so acc's rows are ld > N apart for odd N) and illm_dyadic_rows:
    the reference's t, and the tile kernel's, for M from 9 (the first above the GEMV) up."""
    xq, qw, wm, wk, want = illm_case(m, n, k, 8)
    with emulate.emulating() as emu:
        got = cuda_illm.illm_matmul(xq, qw, wm, wk, 8, kernel="int_mm")
        tile = cuda_illm.illm_matmul(xq, qw, wm, wk, 8, kernel="tile")
    assert torch.equal(got, want) and torch.equal(tile, want)
    (name, grid, args), _ = emu.launches
    assert name == "illm_dyadic_rows" and grid == (m, 1, 1) and args["ld"] == max(16, n + -n % 8)


@pytest.mark.parametrize("mutation", ["ld_dense", "round_down", "tk_no_kmin", "kmin_first_segment"])
def test_dyadic_rows_mutations_are_caught(mutation):
    """illm_dyadic_rows reading acc's rows N apart (not the GEMM's padded ld: N = 125 here), rounding
    down, writing the rows' exponents without kmin, or aligning every segment to the first one's."""
    if mutation == "tk_no_kmin":
        runner = functools.partial(run_matmul_exponents, 20, kernel="int_mm")
    else:
        runner = functools.partial(run_joined_matmul, 20, (40, 13, 72), 8, 96, kernel="int_mm")
    assert_mutation_caught(runner, (), mutation, "differs", emulate.EmulationError)


def joined_case(m, splits, w_bits, k):
    """Sibling linears of one input, each with its own exponent range (so their kmins differ): (xq,
    the joined weights as stored, wm, wk, xk, [each linear's reference t], [its row exponents])."""
    from qconvert.formats.packing import pack_int4

    gen = torch.Generator().manual_seed(m + sum(splits) + w_bits)
    qmax = 127 if w_bits == 8 else 7
    xq = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    xk = torch.randint(-40, 40, (m,), generator=gen)
    qs, wms, wks, wants = [], [], [], []
    for i, n in enumerate(splits):
        q = torch.randint(-qmax - 1, qmax + 1, (n, k), generator=gen, dtype=torch.int8)
        wm = torch.randint(2**15, 2**16, (n,), generator=gen, dtype=torch.int32)
        wk = torch.randint(12 + 7 * i, 22 + 9 * i, (n,), generator=gen, dtype=torch.int32)
        qs.append(q), wms.append(wm), wks.append(wk)
        wants.append(ri.shift(ri.int8_matmul(xq, q.t()) * wm.long(), wk.long() - wk.long().min()))
    q = torch.cat(qs)
    return (xq, pack_int4(q) if w_bits == 4 else q, torch.cat(wms), torch.cat(wks), xk, wants,
            [xk + wk.min() for wk in wks])


def check_joined(t, tk, splits, wants, tks):
    assert t.shape == (tks[0].shape[0], sum(splits)) and tk.shape == (len(splits), tks[0].shape[0])
    start = 0
    for i, n in enumerate(splits):
        assert torch.equal(t[:, start:start + n], wants[i]), f"segment {i}'s t differs"
        assert torch.equal(tk[i], tks[i]), f"segment {i}'s row exponents differ"
        start += n


def run_joined_matmul(m=17, splits=(40, 24, 72), w_bits=8, k=96, mutations=frozenset(), kernel=None):
    """Sibling linears of one input joined along N (segment bounds inside a 64-column tile and on
    one) in one DI-MatMul launch: each segment's t and row exponents equal that linear's own."""
    xq, qw, wm, wk, xk, wants, tks = joined_case(m, splits, w_bits, k)
    kmins = torch.stack([w.min() for w in wk.split(splits)])
    with emulate.emulating(mutations=mutations) as emu:
        t, tk = cuda_illm.illm_matmul(xq, qw, wm, wk, w_bits, xk=xk, splits=splits, kernel=kernel)
        t2, tk2 = cuda_illm.illm_matmul(xq, qw, wm, wk, w_bits, kmin=kmins, xk=xk, splits=splits, kernel=kernel)  # as the model passes them
    assert [name for name, *_ in emu.launches] == [launched(m, sum(splits), w_bits, kernel)] * 2
    check_joined(t, tk, splits, wants, tks)
    check_joined(t2, tk2, splits, wants, tks)


@pytest.mark.parametrize("folds", [0, 2])
def test_requant_with_a_constant_fold_last(folds):
    run_requant(127, ri.clip_int(0.9), folds=folds, const=True)


def test_swiglu_writes_its_scales_as_the_requantizations_folds():
    """``folds=True``: the gate's and the up's scales as the rows of one [2, rows] m and k, the
    same values, ready for illm_requant_rows without stacking."""
    tg, tu = matmul_like(6, 40, 1), matmul_like(6, 40, 2)
    sg, su = row_scales(6, 3, 10, 30), row_scales(6, 4, 10, 30)
    with emulate.emulating():
        a, fm, fk = cuda_illm.swiglu(tg, sg.m[:, 0], sg.k[:, 0], tu, su.m[:, 0], su.k[:, 0], folds=True)
    wa, wg, wu = ri.swiglu(tg, sg, tu, su)
    assert torch.equal(a, wa) and fm.shape == fk.shape == (2, 6) and fm.is_contiguous()
    assert torch.equal(fm, torch.stack([wg.m[:, 0], wu.m[:, 0]])) and torch.equal(fk, torch.stack([wg.k[:, 0], wu.k[:, 0]]))


@pytest.mark.parametrize("kernel", [None, "tile"])
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("m,splits", [(17, (40, 24, 72)), (130, (100, 100)), (1, (64, 13, 8))])
def test_a_joined_matmul_gives_each_linear_its_own_bits(m, splits, w_bits, kernel):
    run_joined_matmul(m, splits, w_bits, kernel=kernel)


@pytest.mark.parametrize("kernel", ["gemv", "tile"])
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("m,splits,k", [(1, (64, 13, 8), 96), (8, (40, 24, 72), 4096), (5, (33,), 288), (2, (17,), 1024)])
def test_the_decode_gemv_gives_the_tile_kernels_bits(m, splits, k, w_bits, kernel):
    """DI-MatMul at M <= 8 runs the GEMV (quik_mainloop.cuh's gemv_sums<false> / <true>, illm_gemv_w8 /
    illm_gemv_w4) by default: with joined segments, row exponents and weight rows of 3 to 256 chunks
    (a partial unrolled step), both kernels equal the reference."""
    run_joined_matmul(m, splits, w_bits, k, kernel=kernel)


def test_the_gemv_takes_at_most_8_rows():
    for w_bits in (8, 4):
        xq, qw, wm, wk, _ = illm_case(9, 16, 64, w_bits)
        with emulate.emulating(), pytest.raises(ValueError, match="gemv: at most 8 rows"):
            cuda_illm.illm_matmul(xq, qw, wm, wk, w_bits, kernel="gemv")


def test_the_w4_gemv_unpacks_every_nibble_value_in_k_order():
    """Every int4 value at every nibble position of a 16-byte chunk, against one-hot activations:
    the GEMV's t is the weight itself, so a nibble read from the wrong position or sign shows."""
    from qconvert.formats.packing import pack_int4

    k, n = 64, 16
    q = ((torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 16 - 8).to(torch.int8)
    xq = torch.zeros((8, k), dtype=torch.int8)
    for m, col in enumerate((0, 1, 7, 8, 30, 31, 32, 63)):
        xq[m, col] = 1
    wm, wk = torch.ones(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
    with emulate.emulating() as emu:
        t = cuda_illm.illm_matmul(xq, pack_int4(q), wm, wk, 4)
    assert emu.launches[0][0] == "illm_gemv_w4"
    assert torch.equal(t, q[:, [0, 1, 7, 8, 30, 31, 32, 63]].t().long())


def test_the_joined_matmuls_splits_are_checked():
    xq = torch.zeros((2, 64), dtype=torch.int8)
    q, ones = torch.zeros((8, 64), dtype=torch.int8), torch.ones(8, dtype=torch.int32)
    for bad in ((4, 3), (4, 0, 4), (2, 2, 2, 2), (8.0,)):
        with pytest.raises(ValueError, match="splits must be 1 to 3 positive column counts adding up to N=8"):
            cuda_illm.illm_matmul(xq, q, ones, ones, 8, splits=bad)
    with pytest.raises(ValueError, match=r"kmin must hold one value per segment \(2\)"), emulate.emulating():
        cuda_illm.illm_matmul(xq, q, ones, ones, 8, kmin=torch.zeros(1, dtype=torch.int32), splits=(4, 4))


@pytest.mark.parametrize("per_head", [True, False])
def test_rope_requant_reads_a_column_slice_in_place(per_head):
    run_rope_requant(per_head=per_head, sliced=True)


def test_swiglu_reads_gate_and_up_from_one_tensor_in_place():
    run_swiglu(joined=True)


def test_matmul_without_columns_still_gives_its_rows_exponents():
    """N = 0: no CTA runs, the rows' exponents are xk + 0 (the launcher's kmin of no weights)."""
    xk = torch.tensor([3, -4, 50])
    with emulate.emulating() as emu:
        t, tk = cuda_illm.illm_matmul(torch.zeros(3, 32, dtype=torch.int8), torch.zeros(0, 32, dtype=torch.int8),
                                      torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 8, xk=xk)
    assert emu.launches == [] and t.shape == (3, 0) and torch.equal(tk, xk)


def test_row_kernels_take_the_parameters_the_emulator_names():
    """Each row kernel's parameter names in illm_gemm.cu, in order, are those its emulator reads."""
    import re

    src = cuda_illm.SOURCE.read_text()
    for name, params, _ in emulate.Emulator.KERNELS:
        m = re.search(rf'extern "C" __global__ void __launch_bounds__\([^)]*\) {name}\((.*?)\) {{', src, re.S)
        if name == "illm_dyadic_rows":
            assert m.group(1) == "ILLM_DYADIC_ARGS" and macro_params(src, "ILLM_DYADIC_ARGS") == params
        elif name.startswith("illm_") and not name.startswith(("illm_matmul", "illm_gemv")):  # those: ILLM_MATMUL_ARGS
            declared = tuple(re.findall(r"(\w+)\s*$", d.strip())[0] for d in m.group(1).split(","))
            assert declared == params, name


def test_an_int64_overflow_is_reported():
    """A requantization of values near 2^62 stays in range (the pre-shift); the emulator's int64
    check itself fires on a product that would wrap on the GPU."""
    with pytest.raises(emulate.EmulationError, match="int64 overflow"):
        emulate.i64((1 << 62) * 4, "test")
    v = torch.full((1, 8), 2**62)
    with emulate.emulating():
        q, _, _ = cuda_illm.requant_rows(v, 127)
    assert torch.equal(q.long(), ri.quantize_rows(v, 127)[0])


MUTATION_CASES = {
    "divby_short": (run_requant, (127,), "error"),
    "round_down": (run_rmsnorm, (127,), "differs"),
    "exp_no_square": (run_softmax, (37,), "differs"),
    "requant_no_clip": (run_requant, (7, ri.clip_int(0.9)), "differs"),
    "wide_no_fold": (run_rope_requant, (), "differs"),
    "rope_sin_sign": (run_rope_requant, (), "differs"),
    "rope_pos0": (run_rope_requant, (), "differs"),
    "rope_column0": (run_rope_into_cache, (), "differs"),
    "silu_sign": (run_swiglu, (), "differs"),
    "swiglu_unfolded": (run_swiglu, (), "differs"),
    "residual_zero_k": (run_residual, (), "differs"),
    "norm_stale_h": (run_residual, (), "differs"),
    "attn_unmasked": (run_attention, (), "differs"),
    "attn_pv_group0": (run_attention, (), "differs"),
    "attn_max_live": (functools.partial(run_attention, negative=True), (), "differs"),
    "attn_scratch_shared": (run_attention, (), "error"),
    "attn_qrow_hh": (functools.partial(run_attention, qdiv=2, hr=6), (), "error"),
    "folds_reversed": (functools.partial(run_requant, folds=3), (127,), "differs"),
    "hadamard_short": (run_hadamard, (), "differs"),
    "heads_unaligned": (run_heads_requant, (), "differs"),
    "heads_zero_kept": (run_heads_requant, (), "differs"),
    "tk_no_kmin": (run_matmul_exponents, (), "differs"),
    "kmin_first_segment": (run_joined_matmul, (), "differs"),
    "ld_dense": (functools.partial(run_rope_requant, sliced=True), (), "differs"),
    "const_fold_first": (functools.partial(run_requant, folds=2, const=True), (127,), "differs"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATION_CASES))
def test_mutation_is_caught(mutation):
    runner, args, expected = MUTATION_CASES[mutation]
    assert_mutation_caught(runner, args, mutation, expected, emulate.EmulationError)


def test_every_row_mutation_has_a_test():
    from qconvert_kernels.quik.emulate import MUTATIONS as bytes_mutations

    assert set(MUTATION_CASES) == set(emulate.MUTATIONS - bytes_mutations)


@pytest.mark.parametrize("m", [3, 70])
def test_the_kernel_benchmark_times_the_kernels_the_model_runs(monkeypatch, m):
    """``qconvert bench --kernels --scheme illm-w8a8`` (gpu_check part e) with its launches on the
    emulator and its timer replaced by one call per operand set: at M <= 8 the GEMV, above
    torch._int_mm and illm_dyadic_rows, and beside either the tile kernel."""
    from helpers import emulated_timer

    from qconvert import bench

    emulated_timer(monkeypatch)
    with emulate.emulating() as emu:
        rows = bench.illm_kernel_rows("probe", 40, 96, m, torch.device("cpu"))
    assert [r["kernel"] for r in rows] == ["cublas-fp16", "illm-matmul-w8", "illm-matmul-w8-tile", "illm-w8a8"]
    names = [n for n, *_ in emu.launches if n.startswith("illm_") and n != "illm_requant_rows"]
    model = "illm_gemv_w8" if m <= 8 else "illm_dyadic_rows"
    assert names == [model] * 2 + ["illm_matmul_w8"] * 2 + [model] * 2


def test_int_mm_prediction_script_labels_its_rows():
    """benchmarks/illm_int_mm_prediction.py (docs/kernels.md quotes it): a row per Llama-3-8B linear at
    M = 4096, labelled a prediction, between the assumed GEMM speeds plus the epilogue's bytes, under
    the first kernel's measured time."""
    from helpers import prediction_json

    data = prediction_json("illm_int_mm_prediction.py")
    rows = data["rows"]
    quik = data["quik_w8a8"]  # QUIK's W8A8 GEMM on the same int8 GEMM, its epilogue 8 bytes per output
    assert sorted(r["shape"] for r in quik) == ["down_proj", "gate_up_proj", "q/o_proj", "qkv_proj"]
    assert all(0 < r["predicted_us"][0] < r["predicted_us"][1] < r["first_us"] for r in quik)
    assert sorted(r["shape"] for r in rows) == ["down_proj", "gate_up_proj", "q/o_proj", "qkv_proj"]
    for r in rows:
        lo, hi = r["predicted_us"]
        assert r["M"] == 4096 and 0 < lo < hi < r["first_us"]  # under the tile kernel's measured time
        assert r["epilogue_us"] == round(12 * 4096 * r["N"] / 2.15e6, 1) and r["requant_us"] > 0
