"""The repacked W4A8 kernels (w4a8_repacked.cu) proven on the CPU: the real launcher (``cuda.prepare``
/ ``cuda.linear``) runs with its launches routed to the lane-exact emulator (w4a8/emulate.py), and
the result must equal the torch reference bit for bit; the emulator checks every memory access,
shared-memory race, pipeline stage, deadlock and output write on the way.  Mutation tests show
that deliberate kernel bugs are caught.  No GPU needed (tests/test_kernels_w4a8r_gpu.py runs the
same cases on one).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import assert_mutation_caught

from qconvert.formats.packing import pack_int4, unpack_int4
from qconvert_kernels import launch
from qconvert_kernels.w4a8 import cuda, emulate, repack
from qconvert_kernels.w4a8 import reference as ref

CU = cuda.SOURCE_R.read_text()


# ----------------------------------------------------------------------------- helpers


def make_layer(n: int, k: int, g: int, layout: str, seed: int, iscale_hi: int = 200):
    gen = torch.Generator().manual_seed(seed)
    kp = -(-k // g) * g
    q = torch.randint(-8, 8, (n, kp), generator=gen, dtype=torch.int8)
    q[:, k:] = 0
    t = {"qweight": pack_int4(q), "shape": torch.tensor([n, k])}
    n_groups = kp // g
    if layout == "w4a8-is":
        t.update(iscale=torch.randint(1, iscale_hi, (n, n_groups), generator=gen, dtype=torch.int32),
                 cscale=torch.rand(n, generator=gen) * 0.01 + 1e-4, alpha_log2=torch.tensor([8], dtype=torch.int32))
    else:
        t.update(scales=(torch.rand((n, n_groups), generator=gen) * 0.02 + 1e-4).half())
    return t


def activations(m: int, k: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed + 17)
    x = torch.randn((m, k), generator=gen) * torch.rand((m, 1), generator=gen) * 4
    if m > 2:
        x[1] = 0  # an all-zero token: t = 0, xq = 0
    return x.to(dtype)


def emulate_linear(x, layout, tensors, g, sm_count=8, prefill_bm=cuda.P_BM, **kw):
    prep = cuda.prepare(layout, tensors, g, "cpu")
    with emulate.emulating(sm_count=sm_count, **kw) as emu:
        out = cuda.linear(x, prep, return_acc=layout == "w4a8-is", prefill_bm=prefill_bm)
    y, acc = out if layout == "w4a8-is" else (out, None)
    return y, acc, cuda.plan(x.shape[0], prep, sm_count, prefill_bm, cuda.prefill_ctas(x.device, prefill_bm)), emu, prep


def check_case(m, n, k, g, layout, dtype=torch.float16, sm_count=8, x=None, tensors=None, prefill_bm=cuda.P_BM, **kw):
    """Emulated launcher == reference, bit for bit (FS in the plan's split order); returns the plan."""
    seed = m * 1_000_003 + n * 1009 + k * 7 + g
    tensors = tensors if tensors is not None else make_layer(n, k, g, layout, seed)
    x = x if x is not None else activations(m, k, dtype, seed)
    y, acc, pl, emu, _ = emulate_linear(x, layout, tensors, g, sm_count, prefill_bm, **kw)
    want = ref.linear_reference(x, layout, tensors, g, bounds=pl.split_bounds(), return_acc=layout == "w4a8-is")
    if layout == "w4a8-is":
        want, acc_ref = want
        assert torch.equal(acc, acc_ref), "int32 accumulator differs"
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"y differs in {(y != want).sum()} places"
    return pl, emu


# ----------------------------------------------------------------------------- the repacked layout


@pytest.mark.parametrize("n,kp", [(1, 32), (13, 96), (136, 576), (300, 640), (128, 64), (830, 544)])
def test_repack_round_trip_and_layout(n, kp):
    gen = torch.Generator().manual_seed(n + kp)
    q = torch.randint(-8, 8, (n, kp), generator=gen, dtype=torch.int8)
    qw = pack_int4(q)
    w4r = repack.repack_weight(qw)
    n128, kq = repack.round_up(n, 128), repack.round_up(kp, 64)
    assert w4r.dtype == torch.uint8 and w4r.numel() == n128 * kq // 2
    assert torch.equal(repack.unrepack_weight(w4r, n, kp), qw)
    # the documented order: word j of lane (gid, tig) of (t, kb) = row 16t + gid + 8(j & 1),
    # k step 2kb + (j >> 1), nibble 2i = k + i, 2i + 1 = k + 4 + i with k = 32 ks + 8 tig
    words = w4r.view(torch.int32).reshape(n128 // 16, kq // 64, 32, 4)
    qp = torch.zeros((n128, kq), dtype=torch.int8)
    qp[:n, :kp] = q
    for t, kb, lane, j in [(0, 0, 0, 0), (0, 0, 5, 1), (min(1, n128 // 16 - 1), kq // 64 - 1, 31, 3), (0, 0, 14, 2)]:
        gid, tig = lane >> 2, lane & 3
        word = int(words[t, kb, lane, j]) & 0xFFFFFFFF
        row, k0 = 16 * t + gid + 8 * (j & 1), 32 * (2 * kb + (j >> 1)) + 8 * tig
        nib = [(word >> (4 * p)) & 0xF for p in range(8)]
        sx = [v - 16 if v >= 8 else v for v in nib]
        assert sx[0::2] == qp[row, k0:k0 + 4].tolist() and sx[1::2] == qp[row, k0 + 4:k0 + 8].tolist()


def test_unpack_gives_16q_in_mma_k_order():
    """qk::int4x4_lo16 / hi16 on a repacked word = 16 * q of real k 8tig+0..3 / 8tig+4..7."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-8, 8, (16, 64), generator=gen, dtype=torch.int8)
    w = repack.repack_weight(pack_int4(q)).view(torch.int32).reshape(-1, 32, 4).numpy().view(np.uint32)
    lane = 9
    gid, tig = lane >> 2, lane & 3
    a = emulate.a_frag(emulate.Ctx(None, {}, frozenset(), emulate.FloatOps(False)), w[0, lane, 0:1], w[0, lane, 1:2])[0]
    b = emulate._bytes_of(a, signed=True)  # [4 regs, 4 bytes]
    assert b[0].tolist() == (16 * q[gid, 8 * tig:8 * tig + 4]).tolist()
    assert b[1].tolist() == (16 * q[gid + 8, 8 * tig:8 * tig + 4]).tolist()
    assert b[2].tolist() == (16 * q[gid, 8 * tig + 4:8 * tig + 8]).tolist()
    assert b[3].tolist() == (16 * q[gid + 8, 8 * tig + 4:8 * tig + 8]).tolist()


def test_repack_scales_and_int16_choice():
    s = torch.tensor([[1, 2], [3, 40000]], dtype=torch.int32)
    assert repack.iscale_dtype(s) == torch.int32 and repack.iscale_dtype(s.clamp_max(32767)) == torch.int16
    out = repack.repack_scales(s, 128, torch.int32)
    assert out.shape == (2, 128) and out[:, :2].tolist() == [[1, 3], [2, 40000]] and not out[:, 2:].any()


# ----------------------------------------------------------------------------- the emulator's own parts


def test_mma_fragment_tables_against_a_per_element_model():
    """mma_m16n8k32 (vectorised tables) equals a per-lane, per-byte loop over the PTX ISA layout."""
    from test_kernels_compile import _mma_m16n8k32

    gen = np.random.default_rng(0)
    a = gen.integers(0, 2**32, (2, 32, 4), dtype=np.uint64).astype(np.uint32)
    b = gen.integers(0, 2**32, (2, 32, 2), dtype=np.uint64).astype(np.uint32)
    c = gen.integers(-1000, 1000, (2, 32, 4)).astype(np.int32)
    d = emulate.mma_m16n8k32(a, b, c)
    for w in range(2):
        want = [[int(v) for v in c[w, lane]] for lane in range(32)]
        _mma_m16n8k32([[int(r) for r in a[w, lane]] for lane in range(32)], [[int(r) for r in b[w, lane]] for lane in range(32)], want)
        assert d[w].tolist() == want


def test_constants_and_parameters_match_the_source():
    def const(name):
        m = re.search(rf"constexpr int {name} = ([^;]+);", CU)
        ns = {k: getattr(emulate, k) for k in dir(emulate) if k.isupper()}
        ns["W4R_D_STAGES"] = int(re.search(r"#define W4R_D_STAGES (\d+)", CU).group(1))   # the build macro's default
        return eval(m.group(1).split("//")[0], {}, ns)  # noqa: S307

    for name in ("THREADS", "WARPS", "BN", "LANE_CHUNK", "D_STAGES", "D_STAGE_BYTES", "D_W_BYTES", "D_XQ_BYTES", "D_AUX_BYTES", "WS_AMAX", "WS_ARRIVE",
                 "WS_DONE", "WS_TILES", "P_BM", "P_STAGES", "P_BK", "P_W_STAGE", "P_X_STAGE"):
        assert const(name) == getattr(emulate, name), name
    assert (cuda.D_STAGES, cuda.D_XQ_BYTES, cuda.D_AUX_BYTES, cuda.WS_TILES, cuda.P_SMEM) == (
        emulate.D_STAGES, emulate.D_XQ_BYTES, emulate.D_AUX_BYTES, emulate.WS_TILES, emulate.P_SMEM)
    assert all(cuda.decode_smem(t) == emulate.decode_smem(t) for t in (1, 2, 4, 8))

    def params(macro):
        body = re.search(rf"#define {macro}\(.*?NAME\((.*?)\) \{{", CU, re.S).group(1)
        body = re.sub(r"/\*.*?\*/", "", body).replace("\\", " ")
        return tuple(re.findall(r"(\w+)\s*$", decl.strip())[0] for decl in body.split(","))

    assert int(re.search(r"#define W4R_SCALE_AHEAD (\d+)", CU).group(1)) == emulate.D_SCALE_AHEAD
    assert params("W4R_DECODE") == emulate.DECODE_PARAMS
    assert params("W4R_DECODE_QUIK") == emulate.QUIK_DECODE_PARAMS
    assert params("W4R_PREFILL") == emulate.PREFILL_PARAMS
    assert params("W4R_PREFILL_QUIK") == emulate.QUIK_PREFILL_PARAMS
    # every [emulate.X] tag of the source names a twin that exists here
    for name in set(re.findall(r"\[emulate\.(\w+)\]", CU)):
        assert hasattr(emulate, name) or name in ("decode_kstep", "prefill_kstep", "prefill_g128", "begin_stage", "p_load_stage", "splitk", "epilogue_value", "load_scale"), name


def test_kernel_names_are_the_declared_ones():
    from qconvert_kernels.w4a8 import REPACKED

    entries = re.findall(r"^W4R_\w+\((\w+)[,)]", CU, flags=re.M)
    assert sorted(entries) == sorted(REPACKED.kernels)


# ----------------------------------------------------------------------------- bit-exact cases

DECODE_CASES = [  # (M, N, K, g, layout, SMs): M from 1 to 64, N and K tails, g = 32 .. 256
    (1, 136, 256, 128, "w4a8-is", 8),
    (2, 256, 576, 64, "w4a8-fs", 8),
    (3, 130, 300, 96, "w4a8-is", 8),      # K % 8 != 0: scalar activation loads; Kp % 64 == 32
    (7, 136, 512, 256, "w4a8-fs", 8),
    (16, 128, 448, 32, "w4a8-is", 8),     # g = 32: a fold every k step; uneven splits
    (17, 200, 640, 128, "w4a8-fs", 1),    # one split: FS bit-exact with the plain reference
    (33, 136, 384, 64, "w4a8-is", 8),
    (64, 256, 1280, 128, "w4a8-is", 2),   # one split of 1280 k: three activation chunks (512 k at M = 64)
    (5, 13, 96, 32, "w4a8-fs", 8),        # N = 13: most channels of the CTA are padding
]
PREFILL_CASES = [
    (130, 136, 256, 64, "w4a8-is", 8),    # two m tiles, the second 2 rows; split-K
    (130, 136, 300, 96, "w4a8-fs", 8),
    (65, 256, 512, 128, "w4a8-fs", 8),
    (200, 130, 160, 32, "w4a8-is", 8),    # 5 groups in 2 splits
    (129, 300, 128, 64, "w4a8-fs", 1),    # one split, three n tiles in a band
    # g = 128: the stage-per-group main loop (and FS's bias conversion)
    (130, 136, 512, 128, "w4a8-is", 8),   # split-K, the second m tile 2 rows
    (200, 300, 384, 128, "w4a8-fs", 1),   # one split: FS bit-exact with the plain reference; N tails
    (257, 128, 1024, 128, "w4a8-fs", 4),  # three m tiles, 8 groups in splits
    (97, 13, 128, 128, "w4a8-is", 8),     # one group, N = 13
    (130, 136, 64, 64, "w4a8-fs", 8),     # Kq = 64: one k64 block, every stage's second half zero-filled
]


@pytest.mark.parametrize("m,n,k,g,layout,sms", DECODE_CASES)
def test_decode_bit_exact(m, n, k, g, layout, sms):
    pl, _ = check_case(m, n, k, g, layout, sm_count=sms)
    assert pl.kind == "decode"


@pytest.mark.parametrize("m,n,k,g,layout,sms", PREFILL_CASES)
def test_prefill_bit_exact(m, n, k, g, layout, sms):
    pl, _ = check_case(m, n, k, g, layout, sm_count=sms)
    assert pl.kind == "prefill"


# The 64-token prefill tiles (w4a8r_prefill_*_bm64, two CTAs per SM): M tails inside and past a tile,
# split-K over the doubled CTA slots, both main loops, N and K tails
PREFILL_BM64_CASES = [
    (65, 136, 512, 128, "w4a8-is", 8),    # two m tiles, the second 1 row; split-K (16 slots, 4 tiles)
    (130, 136, 300, 96, "w4a8-fs", 8),    # three m tiles, the last 2 rows; the one-step loop, K tail
    (100, 300, 384, 128, "w4a8-fs", 1),   # one split: FS bit-exact with the plain reference; N tails
    (200, 130, 160, 32, "w4a8-is", 2),    # 5 groups; the one-step loop
    (97, 13, 128, 128, "w4a8-is", 8),     # one group, N = 13
]


@pytest.mark.parametrize("m,n,k,g,layout,sms", PREFILL_BM64_CASES)
def test_prefill_bm64_bit_exact(m, n, k, g, layout, sms):
    pl, emu = check_case(m, n, k, g, layout, sm_count=sms, prefill_bm=64)
    assert pl.kind == "prefill" and pl.kernel.endswith("_bm64") and pl.smem == cuda.p_smem(64) == 64 * 1024
    assert pl.mtiles == -(-m // 64) and (pl.splits == 1 or pl.splits * pl.mtiles * pl.ntiles <= 2 * sms)
    assert [e[0] for e in emu.launches][-1] == pl.kernel
    for site in ("prefill weight LDS.128", "prefill x LDS.64", "prefill x cp.async", "prefill weight cp.async"):
        assert emu.conflicts[site] == 1, (site, emu.conflicts[site])


def test_prefill_bm64_splits_over_two_ctas_per_sm():
    """Where 128-token tiles leave SMs idle, 64-token tiles fill twice the slots: q/o at M = 256 on
    132 SMs is 64 tiles x 2 splits (one CTA per SM) at BM = 128, 128 tiles x 2 splits at BM = 64."""
    p128, p64 = cuda.plan(256, _Meta(4096, 4096), 132), cuda.plan(256, _Meta(4096, 4096), 132, 64)
    assert (p128.mtiles * p128.ntiles, p128.splits, p128.kernel) == (64, 2, "w4a8r_prefill_is")
    assert (p64.mtiles * p64.ntiles, p64.splits, p64.kernel) == (128, 2, "w4a8r_prefill_is_bm64")
    assert cuda.plan(4096, _Meta(4096, 4096), 132, 64).splits == 1
    with pytest.raises(ValueError, match="prefill_bm"):
        cuda.plan(256, _Meta(4096, 4096), 132, 32)


@pytest.mark.parametrize("mutation", ("stage_off_by_one", "no_wait", "swizzle_off", "c_map", "g128_carry"))
def test_mutation_is_caught_in_the_bm64_prefill(mutation):
    with pytest.raises((emulate.EmulationError, AssertionError)) as e:
        check_case(65, 136, 1024, 128, "w4a8-is", prefill_bm=64, mutations=frozenset({mutation}))  # 2 groups per split
    assert isinstance(e.value, emulate.EmulationError) or "differs" in str(e.value)


@pytest.mark.parametrize("m,layout,g", [(3, "w4a8-is", 64), (9, "w4a8-fs", 64), (130, "w4a8-is", 64), (130, "w4a8-fs", 128)])
def test_bf16(m, layout, g):
    check_case(m, 136, 320, g, layout, dtype=torch.bfloat16)


def test_splits_cover_every_case_shape():
    """The cases above run S == 1 and S > 1 (uneven too) on both kernels, and several x chunks."""
    seen = set()
    for m, n, k, g, layout, sms in DECODE_CASES + PREFILL_CASES:
        prep = cuda.prepare(layout, make_layer(n, k, g, layout, 0), g, "cpu")
        pl = cuda.plan(m, prep, sms)
        seen.add((pl.kind, pl.splits > 1, pl.gr > 0))
        if pl.kind == "prefill" and g == 128:
            seen.add(("prefill g128", pl.splits > 1))
        bounds = pl.split_bounds()
        assert bounds[0][0] == 0 and bounds[-1][1] == prep.n_groups and all(b[0] < b[1] for b in bounds)
        assert all(b1[1] == b2[0] for b1, b2 in zip(bounds, bounds[1:]))
        if pl.kind == "decode" and pl.splits == 1 and m > 32:
            seen.add("chunks")  # 1280 k at M = 64: chunks of 512
    assert {("decode", True, True), ("decode", True, False), ("decode", False, False), ("prefill", True, True),
            ("prefill", True, False), ("prefill", False, False), "chunks", ("prefill g128", True), ("prefill g128", False)} <= seen


def test_overflow_adversarial_input_reaches_the_bound():
    """x = 127 sign(q) on the channel with the least headroom drives A to the converter's bound."""
    from qconvert.methods.integer_scale import IntegerScaleMethod

    gen = torch.Generator().manual_seed(0)
    w = torch.randn((136, 512), generator=gen) * 0.02
    ql = IntegerScaleMethod({"group_size": 128}).quantize_linear("adversarial", w)
    info, tens = ql.info, dict(ql.tensors)
    worst, bound = info["worst_channel"], info["bound"]
    q = unpack_int4(tens["qweight"])
    sign = torch.sign(q[worst].float())[:512]
    x = torch.stack([sign, -sign] + [torch.randn(512, generator=gen) for _ in range(2)]).half()
    for m_extra in (0, 126):  # decode, and prefill (130 rows)
        xx = torch.cat([x, torch.randn((m_extra, 512), generator=gen).half()]) if m_extra else x
        y, acc, pl, _, _ = emulate_linear(xx, "w4a8-is", tens, 128)
        assert int(acc[0, worst]) == bound and int(acc[1, worst]) == -bound and bound <= 2**31 - 1
        want, acc_ref = ref.linear_reference(xx, "w4a8-is", tens, 128, return_acc=True)
        assert torch.equal(acc, acc_ref) and torch.equal(y.view(torch.int16), want.view(torch.int16)), pl.kind


def _subnormal_case():
    """bf16 rows whose values are float32 subnormals (amax 2^-125, entries 2^-127), and a row whose
    amax is above 2^126 (1 / amax is subnormal): FTZ would quantize them to zeros."""
    k = 256
    x = torch.zeros((3, k))
    x[0, ::3] = 2.0**-127
    x[0, 5] = 2.0**-125
    x[1, :] = torch.linspace(-1, 1, k) * 2.0**127
    x[2, :] = torch.linspace(-3, 2, k)
    return x.to(torch.bfloat16)


def test_reference_keeps_subnormals_and_huge_rows():
    x = _subnormal_case()
    xq, t = ref.quantize_per_token_int8(x, 256)
    assert (xq[0] != 0).sum() > 80 and (xq[1] != 0).sum() > 200  # not flushed
    assert 0 < float(t[0]) < 2.0**-126  # the scale itself is subnormal


@pytest.mark.parametrize("m", [3, 130])
def test_subnormal_and_huge_amax_rows_bit_exact(m):
    x = _subnormal_case()
    if m > 3:
        x = torch.cat([x, torch.randn((m - 3, 256)).to(torch.bfloat16)])
    t = make_layer(136, 256, 64, "w4a8-is", 3)
    t["cscale"] = torch.full((136,), 2.0**-100)  # y = A * t * cs lands in the subnormal range for row 0
    check_case(m, 136, 256, 64, "w4a8-is", dtype=torch.bfloat16, x=x, tensors=t)


def test_ftz_would_be_caught():
    x = _subnormal_case()
    t = make_layer(136, 256, 64, "w4a8-is", 3)
    with pytest.raises(AssertionError):
        check_case(3, 136, 256, 64, "w4a8-is", dtype=torch.bfloat16, x=x, tensors=t, mutations=frozenset({"ftz"}))


# ----------------------------------------------------------------------------- protocols


def test_workspace_returns_to_zero_and_a_second_call_is_exact():
    t = make_layer(256, 1024, 128, "w4a8-fs", 11)
    prep = cuda.prepare("w4a8-fs", t, 128, "cpu")
    x1, x2 = activations(5, 1024, torch.float16, 1), activations(5, 1024, torch.float16, 2)
    with emulate.emulating(sm_count=8):
        y1 = cuda.linear(x1, prep)
        assert not prep.workspace.any()
        y2 = cuda.linear(x2, prep)
    pl = cuda.plan(5, prep, 8)
    assert pl.splits > 1 and pl.amax_ctas > 1
    for x, y in ((x1, y1), (x2, y2)):
        assert torch.equal(y, ref.linear_reference(x, "w4a8-fs", t, 128, bounds=pl.split_bounds()))


def test_split_k_is_deterministic_whatever_the_arrival_order():
    """FS with 6 splits: different CTA interleavings give the same bits (fixed split order); summing in
    arrival order instead (the ticket_order mutation) changes the result for some order."""
    m, n, k, g = 4, 128, 1536, 64
    t = make_layer(n, k, g, "w4a8-fs", 21)
    t["scales"] = (torch.rand(t["scales"].shape, generator=torch.Generator().manual_seed(1)) * 3 + 0.01).half()
    x = activations(m, k, torch.float16, 4)
    outs, orders = [], []
    for seed in range(4):
        y, _, pl, emu, _ = emulate_linear(x, "w4a8-fs", t, g, sm_count=16, seed=seed, resident=24)
        outs.append(y)
        orders.append(emu.ticket_orders[-1])
    assert pl.splits >= 4
    assert len({str(o) for o in orders}) > 1, "the scheduler should produce different arrival orders"
    assert all(torch.equal(o, outs[0]) for o in outs)
    want = ref.linear_reference(x, "w4a8-fs", t, g, bounds=pl.split_bounds())
    assert torch.equal(outs[0], want)
    bad = [emulate_linear(x, "w4a8-fs", t, g, sm_count=16, seed=seed, resident=24, mutations=frozenset({"ticket_order"}))[0]
           for seed in range(6)]
    assert any(not torch.equal(b, want) for b in bad)


def test_amax_publishers_need_only_their_own_residency():
    """Decode CTAs spin until the A amax publishers have arrived.  The publishers are the first A CTAs
    in dispatch order and A <= the SM count (the plan), so the launch completes with as few as A
    CTAs resident; fewer would deadlock (the emulator finds it), and so would publishers placed at
    the end of the grid even with many resident CTAs."""
    t = make_layer(256, 1024, 64, "w4a8-is", 9)
    prep = cuda.prepare("w4a8-is", t, 64, "cpu")
    pl = cuda.plan(5, prep, 8)
    assert 2 <= pl.amax_ctas <= 8 < pl.grid[0] * pl.grid[1]
    check_case(5, 256, 1024, 64, "w4a8-is", tensors=t, resident=pl.amax_ctas)
    with pytest.raises(emulate.EmulationError, match="deadlock"):
        check_case(5, 256, 1024, 64, "w4a8-is", tensors=t, resident=pl.amax_ctas - 1)
    with pytest.raises(emulate.EmulationError, match="deadlock"):
        check_case(5, 256, 1024, 64, "w4a8-is", tensors=t, resident=8, mutations=frozenset({"late_publishers"}))


def test_plan_caps_the_publishers_at_the_sm_count():
    for n, k in LLAMA3_8B.values():
        for m in (1, 4, 5, 16, 64):
            pl = cuda.plan(m, _Meta(n, k), 132)
            if m <= cuda.OWN_AMAX_MAX_M and m * k * 2 <= cuda.OWN_AMAX_BYTES:
                assert pl.amax_ctas == 0 and 1 << pl.ak_log2 >= k > 1 << (pl.ak_log2 - 1), (m, k, pl)  # rows read whole
            else:
                assert 1 <= pl.amax_ctas <= 132 and pl.amax_ctas << pl.ak_log2 >= k > (pl.amax_ctas - 1) << pl.ak_log2
    # batch 1 takes its own amax on the Llama-3-8B linears of K = 4096 (8 KB), not on down_proj (28 KB;
    # slower so on the H200), and batch 4 on none
    for n, k in LLAMA3_8B.values():
        assert (cuda.plan(1, _Meta(n, k), 132).amax_ctas == 0) == (k == 4096), (n, k)
        assert cuda.plan(4, _Meta(n, k), 132).amax_ctas > 0


def test_own_amax_decode_touches_no_workspace_and_is_exact():
    """M <= 4 tokens with at most 8 KB of activations: every CTA takes the whole rows' amax itself
    (A = 0) and none takes part in the exchange, so one CTA resident at a time completes the launch;
    the result is the reference's, bit for bit, with split-K, at the 8 KB boundary and on odd K.
    One token more, or a few bytes more, and the exchange is back."""
    for m, n, k, g, layout in ((1, 136, 4096, 128, "w4a8-is"), (4, 136, 1024, 64, "w4a8-is"), (1, 300, 900, 96, "w4a8-fs"),
                               (2, 13, 96, 32, "w4a8-is")):
        prep = cuda.prepare(layout, make_layer(n, k, g, layout, 5), g, "cpu")
        assert cuda.plan(m, prep, 8).amax_ctas == 0
        pl, emu = check_case(m, n, k, g, layout, resident=1)   # one CTA resident at a time: nobody waits
        assert pl.amax_ctas == 0 and (k != 4096 or pl.splits > 1)
        assert emu.amax_paths[-1] == {"own": pl.grid[0] * pl.grid[1]}, emu.amax_paths
    assert cuda.plan(5, cuda.prepare("w4a8-is", make_layer(136, 1024, 128, "w4a8-is", 5), 128, "cpu"), 8).amax_ctas > 0
    assert cuda.plan(2, cuda.prepare("w4a8-is", make_layer(136, 4096, 128, "w4a8-is", 5), 128, "cpu"), 8).amax_ctas > 0
    assert cuda.plan(1, cuda.prepare("w4a8-is", make_layer(136, 4128, 32, "w4a8-is", 5), 32, "cpu"), 8).amax_ctas > 0


def test_zero_filled_copies_name_real_addresses():
    """A prefill copy with nothing to read (src-size 0: past M, KB or Kq) still names an address
    inside the buffers: with Kq = 64 the second k64 block of a stage and the activation chunks past
    64 bytes do not exist, and the fallback to stage 0's address, as first written, points past the
    last tile's weights and past the last row's activations; the emulator bounds-checks every one."""
    check_case(130, 136, 64, 64, "w4a8-is")
    with pytest.raises(emulate.EmulationError, match="cp.async"):
        check_case(130, 136, 64, 64, "w4a8-is", mutations=frozenset({"fallback_stage0"}))


def test_own_amax_reads_the_rows_whole():
    """The own_amax_half mutation (each CTA reads half of every row) is caught: a row whose largest
    activation is in its second half quantizes with the wrong scale."""
    x = activations(3, 512, torch.float16, 8)
    x[:, 300] = 50.0
    with pytest.raises(AssertionError, match="differs"):
        check_case(3, 136, 512, 128, "w4a8-is", x=x, mutations=frozenset({"own_amax_half"}))
    check_case(3, 136, 512, 128, "w4a8-is", x=x)


def test_scale_schedule_check_can_fail():
    """check_scale_schedule against made-up logs of one CTA with groups 0..5, 2 ahead: the schedule
    passes; a prefetch one group on, a missing prefetch, a read twice or a read late fails."""
    good = [(0, "load", 0, -1), (0, "prefetch", 1, -1), (0, "prefetch", 2, -1)]
    for g in range(5):
        good.append((0, "load", g + 1, g))
        if g + 3 < 6:
            good.append((0, "prefetch", g + 3, g))
    emulate.check_scale_schedule("k", good, (1, 1, 1), 6, 0, 2)
    bad = {"shifted": [e if e[1] != "prefetch" else (0, "prefetch", e[2] + 1, e[3]) for e in good],
           "missing": [e for e in good if e[1:3] != ("prefetch", 4)],
           "twice": good + [(0, "load", 3, 2)],
           "late": [e if e[1:3] != ("load", 3) else (0, "load", 3, 3) for e in good]}
    for what, log in bad.items():
        with pytest.raises(emulate.EmulationError, match="off the schedule"):
            emulate.check_scale_schedule("k", log, (1, 1, 1), 6, 0, 2)
    # and without the prefetch (ahead 0) the reads alone are the schedule
    emulate.check_scale_schedule("k", [e for e in good if e[1] == "load"], (1, 1, 1), 6, 0, 0)
    with pytest.raises(emulate.EmulationError):
        emulate.check_scale_schedule("k", good, (1, 1, 1), 6, 0, 0)


def test_main_loop_shared_accesses_are_bank_conflict_free():
    _, emu_d = check_case(16, 256, 512, 128, "w4a8-is")
    _, emu_p = check_case(130, 136, 256, 128, "w4a8-is")
    conflicts = {**emu_d.conflicts, **emu_p.conflicts}
    for site in ("decode weight LDS.128", "decode x LDS.64", "prefill weight LDS.128", "prefill x LDS.64",
                 "prefill x cp.async", "prefill weight cp.async", "decode weight cp.async"):
        assert conflicts[site] == 1, (site, conflicts[site])
    # and the swizzle is what makes the prefill activation reads conflict-free
    emu = emulate.Emulator(mutations=frozenset({"swizzle_off"}))
    with launch.launch_hook(emu):
        prep = cuda.prepare("w4a8-is", make_layer(136, 256, 128, "w4a8-is", 0), 128, "cpu")
        cuda.linear(activations(130, 256, torch.float16, 0), prep)
    assert emu.conflicts["prefill x LDS.64"] > 1


# ----------------------------------------------------------------------------- mutations

MUTATION_CASES = {
    # mutation: (case, expected: "error" (an emulator check fires) or "mismatch")
    "swap_halves": ((5, 136, 512, 128, "w4a8-is"), "mismatch"),
    "no_sign": ((130, 136, 256, 64, "w4a8-is"), "mismatch"),
    "c_map": ((3, 136, 576, 64, "w4a8-fs"), "mismatch"),
    "stage_off_by_one": ((5, 136, 512, 128, "w4a8-is"), "error"),
    "no_wait": ((130, 136, 256, 64, "w4a8-is"), "error"),
    "no_barrier": ((5, 136, 512, 128, "w4a8-is"), "error"),
    "no_stage_barrier": ((130, 136, 256, 64, "w4a8-fs"), "error"),
    "swizzle_off": ((130, 136, 256, 64, "w4a8-is"), "mismatch"),
    "amax_local": ((16, 136, 1024, 128, "w4a8-is"), "mismatch"),
    "k_perm": ((5, 136, 512, 128, "w4a8-fs"), "mismatch"),
    "g128_carry": ((130, 136, 512, 128, "w4a8-is"), "mismatch"),
    "bias_off": ((130, 136, 512, 128, "w4a8-fs"), "mismatch"),
    "prefetch_next": ((3, 136, 2048, 128, "w4a8-is"), "error"),
}

@pytest.mark.parametrize("mutation", sorted(MUTATION_CASES))
def test_mutation_is_caught(mutation):
    case, expected = MUTATION_CASES[mutation]
    assert_mutation_caught(check_case, case, mutation, expected, emulate.EmulationError)


def test_every_mutation_has_a_test():
    # quik_order, quik_no_z: tests/test_kernels_quik_repacked.py (QUIK's epilogue); zq_*:
    # tests/test_kernels_zq_repacked.py (ZeroQuant-FP's decode)
    covered = set(MUTATION_CASES) | {"ftz", "ticket_order", "late_publishers", "own_amax_half", "fallback_stage0",
                                     "quik_order", "quik_no_z", "zq_gather", "zq_sign", "zq_qmax", "widen_row",
                                     "widen_group", "lorc_u_row", "lorc_lanes"}
    assert covered == set(emulate.MUTATIONS)


# The g = 128 prefill main loop has its own code: the pipeline and fragment mutations are caught there too.
G128_MUTATIONS = ("stage_off_by_one", "no_wait", "no_stage_barrier", "swizzle_off", "no_sign", "swap_halves", "c_map")


@pytest.mark.parametrize("mutation", G128_MUTATIONS)
def test_mutation_is_caught_in_the_g128_prefill(mutation):
    case = (130, 136, 512, 128, "w4a8-fs")
    with pytest.raises((emulate.EmulationError, AssertionError)) as e:
        check_case(*case, mutations=frozenset({mutation}))
    assert isinstance(e.value, emulate.EmulationError) or "differs" in str(e.value)


def test_bias_conversion_is_exact_in_its_range_only():
    """FS's g = 128 prefill starts each group's int32 sum at the bits of the float 2^23 + 2^22, so the
    sum 16P comes out as a float's bits, and one FADD makes float(16P): equal to I2F on the whole range
    |16P| <= 2^22, which g = 128 stays in (|16P| <= 16 * 128 * 8 * 128 = 2^21).  One past it the same
    arithmetic is wrong, and the emulator refuses such a sum.  (numpy's float32 arithmetic, the
    emulator's: the device's FADD is checked by the GPU tests.)"""
    ctx = emulate.Ctx(mem=None, args={}, mutations=frozenset(), fops=emulate.FloatOps(False))
    edge = 1 << 22
    v = np.concatenate([np.arange(-edge, -edge + 4096), np.arange(-4096, 4096), np.arange(edge - 4096, edge + 1),
                        np.random.default_rng(0).integers(-edge, edge + 1, 200_000)])
    assert np.array_equal(emulate.biased_to_float(ctx, emulate.G128_FS_INIT + v), v.astype(np.float32))
    assert 16 * 128 * 8 * 128 <= edge
    outside = np.array([edge + 1, -edge - 1], np.int64)
    raw = ((emulate.G128_FS_INIT + outside) & 0xFFFFFFFF).astype(np.uint32).view(np.float32) - np.float32(12582912.0)
    assert not np.array_equal(raw, outside.astype(np.float32))
    with pytest.raises(emulate.EmulationError, match="2\\^22"):
        emulate.biased_to_float(ctx, emulate.G128_FS_INIT + outside)
    assert re.search(r"P_INIT = kKind == KIND_FS \? 0x4B400000 : 0;", CU) and emulate.G128_FS_INIT == 0x4B400000


# ----------------------------------------------------------------------------- launcher (no GPU)


def test_linear_never_synchronizes(monkeypatch):
    """linear reads no device value on the host: .item(), int(t), float(t), bool(t), .tolist(),
    .cpu(), .numpy() all fail while it runs; the launches are recorded, not executed."""
    t = make_layer(136, 320, 64, "w4a8-is", 1)
    prep = cuda.prepare("w4a8-is", t, 64, "cpu")
    calls = []

    def boom(*a, **k):
        raise AssertionError("host synchronization in linear()")

    def record(*a):
        calls.append(a)
        for arg in a[3]:  # every pointer argument is a live tensor at the launch
            if getattr(arg, "dtype", None) is not None and arg.dtype.name == "uint64" and int(arg):
                launch.tensor_at(int(arg))

    for m in (1, 40, 130):
        x = activations(m, 320, torch.float16, m)
        with launch.launch_hook(record, sm_count=132), monkeypatch.context() as mp:
            for attr in ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "cpu", "numpy"):
                mp.setattr(torch.Tensor, attr, boom)
            cuda.linear(x, prep)
    names = [c[0] for c in calls]
    assert names == ["w4a8r_decode_is_m8", "w4a8r_decode_is_m64", "w4a8r_quantize_f16", "w4a8r_prefill_is"]


def test_prepare_and_linear_validate_their_inputs():
    t = make_layer(64, 128, 64, "w4a8-is", 0)
    with pytest.raises(ValueError, match="layout"):
        cuda.prepare("w4a8-xx", t, 64, "cpu")
    with pytest.raises(ValueError, match="g=48"):
        cuda.prepare("w4a8-is", t, 48, "cpu")
    with pytest.raises(ValueError, match="needs tensor 'scales'"):
        cuda.prepare("w4a8-fs", t, 64, "cpu")
    bad = dict(t, alpha_log2=torch.tensor([127], dtype=torch.int32))
    with pytest.raises(ValueError, match="alpha_log2"):
        cuda.prepare("w4a8-is", bad, 64, "cpu")
    prep = cuda.prepare("w4a8-is", t, 64, "cpu")
    with launch.launch_hook(lambda *a: None):
        with pytest.raises(ValueError, match="K=100"):
            cuda.linear(torch.zeros((2, 100), dtype=torch.float16), prep)
        with pytest.raises(ValueError, match="float16 or bfloat16"):
            cuda.linear(torch.zeros((2, 128)), prep)
        assert cuda.linear(torch.zeros((0, 128), dtype=torch.float16), prep).shape == (0, 64)
    with pytest.raises(ValueError, match="CUDA"):  # no hook: CPU tensors are refused
        cuda.linear(torch.zeros((2, 128), dtype=torch.float16), prep)


LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
             "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
             "qkv_proj": (6144, 4096), "gate_up_proj": (28672, 4096)}


class _Meta(cuda.PreparedW4A8):
    """A prepared layer's sizes without its tensors (plan only reads sizes)."""

    def __init__(self, n, k, g=128, layout="w4a8-is"):
        self.layout, self.n, self.k, self.kp, self.group_size = layout, n, k, -(-k // g) * g, g


@pytest.mark.parametrize("shape", sorted(LLAMA3_8B))
def test_plan_keeps_every_sm_busy_on_llama3_8b(shape):
    n, k = LLAMA3_8B[shape]
    for m in (1, 4, 16, 64):
        pl = cuda.plan(m, _Meta(n, k), 132)
        # every SM gets a CTA, and all of them are resident at once (two per SM): one wave
        assert pl.kind == "decode" and 132 <= pl.grid[0] * pl.grid[1] <= 2 * 132, (m, pl)
    for m in (256, 1024, 4096):
        pl = cuda.plan(m, _Meta(n, k), 132)
        tiles = pl.mtiles * pl.ntiles
        assert pl.kind == "prefill"
        if tiles >= 132:
            assert pl.splits == 1, (m, pl)
        else:  # as many splits as one wave of one CTA per SM holds, at most 4
            assert tiles * pl.splits <= 132 and (pl.splits == 4 or tiles * (pl.splits + 1) > 132), (m, pl)


@pytest.mark.parametrize("m", [16, 65])
def test_the_kernel_benchmark_times_the_bm64_prefill_beside(monkeypatch, m):
    """``qconvert bench --kernels`` (gpu_check part b) with its launches on the emulator and its timer
    replaced by one call per operand set: above 64 rows a ``w4a8-is-bm64`` row comes from the 64-token
    kernel, whose output it finds equal to the 128-token one's; at decode there is no such row."""
    from helpers import emulated_timer

    from qconvert import bench

    emulated_timer(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "cpu (emulated)")
    with emulate.emulating(sm_count=8) as emu:
        rows = bench.kernel_rows("probe", 136, 256, m, torch.device("cpu"))
    launched = {n for n, *_ in emu.launches}
    if m <= cuda.DECODE_MAX_M:
        assert [r["kernel"] for r in rows] == ["cublas-fp16", "w4a8-is", "w4a8-fs"] and not any("prefill" in n for n in launched)
        return
    assert [r["kernel"] for r in rows] == ["cublas-fp16", "w4a8-is", "w4a8-is-bm64", "w4a8-fs"]
    assert rows[2]["same_bits_as_bm128"] is True and rows[2]["vs_bm128"] == 1.0 and "vs_cublas" in rows[2]
    assert {"w4a8r_prefill_is", "w4a8r_prefill_is_bm64", "w4a8r_prefill_fs"} <= launched


def test_prefill_bm64_slots_follow_the_ctas_an_sm_holds():
    """sm_86 / sm_89 hold one 64 KB CTA per SM (100 KB of shared memory), not two: the plan's split
    counts the slots it is given (cuda.prefill_ctas from the device's shared memory per SM)."""
    two, one = (cuda.plan(256, _Meta(1024, 4096), 58, 64, c) for c in (2, 1))
    assert two.mtiles * two.ntiles == 32 and (two.splits, one.splits) == (3, 1)
    assert cuda.prefill_ctas(torch.device("cpu"), 64) == 2 and cuda.prefill_ctas(torch.device("cpu"), 128) == 1
