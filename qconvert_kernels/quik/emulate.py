"""Lane-exact CPU emulator of the 64 x 64 tile kernels of quik_gemm.cu, illm_gemm.cu (DI-MatMul)
and w4a8_gemm.cu (the native-layout W4A8 GEMMs and their int8 quantizer).

These kernels share two main loops: the byte main loop of quik_mainloop.cuh (W8A8 on int8 tensor
cores, and int4 x int4 on int4 tensor cores, ``mma.m16n8k64.s4``) and the native W4A8 main loop of
w4a8/w4a8_mainloop.cuh (int8 activations against packed int4 weights widened in registers, with
group folds: w4a8_gemm.cu's integer-scale and float-scale GEMMs, QUIK's W4A4 path on sm_90,
DI-MatMul w4).  On them sit QUIK's float epilogue, DI-MatMul's dyadic integer epilogue, the W4A8
folds and epilogues, and QUIK's split-and-quantize kernel.  Without a GPU this is how they are
proven: each launch of the real launchers (``quik.cuda.split_quantize`` / ``quik_gemm`` /
``quik_linear``, ``illm.cuda.illm_matmul``, ``w4a8.cuda.w4a8_is_gemm`` / ``w4a8_fs_gemm`` /
``quantize_per_token_int8``) lands here through ``launch.launch_hook`` and runs the same program on
numpy arrays, the 128 threads of a CTA as one axis:

  * global memory is the tensors the launcher passed, reached only through their pointers, every
    access checked for bounds and alignment (``w4a8.emulate.Global``);
  * shared memory remembers who wrote each byte, in which barrier interval and for which stage:
    a read of bytes not written for the current stage, or written by another thread with no
    ``__syncthreads`` between, and a write over bytes another thread read since the last barrier,
    are errors (``w4a8.emulate.Shared``); bank conflicts are recorded per access site;
  * the tensor-core products are built from the lanes' registers with the PTX ISA fragment
    tables of ``mma.m16n8k32.s8`` (``w4a8.emulate.mma_m16n8k32``) and ``mma.m16n8k64.s4``
    (``mma_m16n8k64_s4`` here): the K permutation the kernels apply to both operands is not
    assumed, it has to cancel;
  * the int4 widening is the kernel's own integer instructions (``unpack_int4x8``: xor, masks,
    PRMT, add, xor), and every float operation is rounded once to float32 as written (no FMA);
  * every output element is written exactly once.

``mutations`` switch on deliberate kernel bugs; tests/test_kernels_quik_emulate.py checks that
each one is caught.  The index math is written here a second time, with the .cu's names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from qconvert_kernels import launch
from qconvert_kernels.w4a8.emulate import (EmulationError, FloatOps, Global, Shared, Ctx, bf16_bits_to_f32, byte_perm,
                                           f16_bits_to_f32, f32_to_bits16, mma_c_lanes, mma_m16n8k32, quantize_rows,
                                           store_pair, wrap32)
from qconvert_kernels.w4a8.emulate import QUANT_PARAMS as W4A8_QUANT_PARAMS

# ----------------------------------------------------------------------------- constants
# Twins of qk:: (w4a8_mainloop.cuh) and quik:: (quik_mainloop.cuh); the tests parse the sources.
BM = 64
BN = 64
BK = 64
THREADS = 128
WM = 32
WN = 32
MT = WM // 16
NT = WN // 8
A_STRIDE = 96
B_STRIDE = 48
ROW_LOADS = BM * BK // 16 // THREADS     # quik::ROW_LOADS, qk::A_LOADS (2); packed rows: qk::B_LOADS (1)
QUANT_THREADS = 256
WIDE_THREADS = 1024      # quik::WIDE_THREADS and the wide split's other constants
WIDE_SLOTS = 8
FUSED_ROWS = 8
FUSED_MAX_OUT = 1024
GEMV_COLS = WIDE_THREADS // 32
GV_ROWS, GV_COLS, GV_WARPS, GV_UNROLL = 8, 2, 8, 4   # quik::GV_* (the W8A8 GEMV)
GV_THREADS = GV_WARPS * 32

GEMM_PARAMS = ("xq", "s", "z", "qw", "wscale", "wsum", "y_out", "y", "acc_out", "M", "N", "Kbp")
SPLIT_PARAMS = ("x", "base_idx", "outlier_idx", "xq", "s", "z", "x_out", "M", "K", "Kb", "Kbp", "n_out", "bits", "pack",
                "clip")
SPLIT_WIDE_PARAMS = ("x", "base_idx", "outlier_idx", "xq", "s", "z", "x_out", "w_out", "y_out", "M", "K", "Kb", "Kbp",
                     "n_out", "N", "bits", "pack", "clip")
ILLM_PARAMS = ("xq", "qw", "wm", "wk", "kmin_p", "t", "xk", "tk", "M", "N", "K", "n1", "n2")
EPI_PARAMS = ("acc", "s", "z", "wscale", "wsum", "y_out", "y", "M", "N", "ld")
EPI_THREADS = 256
IS_PARAMS = ("xq", "t", "qw", "iscale", "cscale", "alpha_log2", "y", "acc_out", "M", "N", "Kp", "group_size")
FS_PARAMS = ("xq", "t", "qw", "scales", "y", "M", "N", "Kp", "group_size")

MUTATIONS = frozenset({
    "swap_a",          # a[1] and a[2] exchanged in the A fragments (rows gid + 8 against k 4..7)
    "b_offset",        # the byte main loop's B fragment at 4 tig instead of 8 tig (a misaligned LDS.64)
    "b_swap",          # the byte main loop's b0 and b1 exchanged (B's k order no longer A's)
    "no_tail_sync",    # the trailing __syncthreads of a stage left out
    "no_row_bound",    # load_rows without the row < rows check
    "no_sign",         # unpack_int4x8 without its final xor (no sign extension)
    "c_map",           # the epilogue reads c1 where it means c2
    "split_short",     # quik_split (both kernels) writes only the Kb base columns, not the padding up to Kbp
    "no_clip",         # quik_split (both kernels) ignores its clip (the token's full min / max)
    "fold_stale",      # w4a8_gemm.cu's folds load the scales of the group just folded again
    "wide_slots",      # quik_split_wide holds one channel pair per thread too few (WIDE_SLOTS - 1)
    "wide_pair_swap",  # quik_split_wide's 16-bit store puts channel 2p + 1's code in the low byte
    "outlier_seq",     # the fused outlier product summed channel after channel, not lane sums + butterfly
    "gemv_stride",     # the GEMVs' lanes step 16 chunks along the row instead of 32
    "gemv4_no_sign",   # the w4 GEMV's nibbles not sign-extended (no xor 8 / __vsub4 8)
    "gemv4_perm",      # the w4 GEMV's PRMT selectors for the even and the odd k exchanged
    "gemv_lane_map",   # the W8A8 GEMV's lane j selects the sum of (j % GV_ROWS, j / GV_ROWS) for output (j / GV_COLS, j % GV_COLS)
    "epi_ld_dense",    # quik_epilogue_rows reading acc's rows N apart, not the GEMM's padded ld
})

_LANE = np.arange(32)
_GID, _TIG = _LANE >> 2, _LANE & 3
# PTX ISA, "Matrix Fragments for mma.m16n8k64" (.s4): each register holds 8 nibbles, nibble i
# lowest first.  A: a0 row gid, a1 row gid + 8, a2 / a3 the same rows 32 columns on, col 8 tig + i.
_A4_ROW = _GID[:, None, None] + 8 * (np.arange(4)[None, :, None] & 1) + 0 * np.arange(8)[None, None, :]
_A4_COL = 8 * _TIG[:, None, None] + np.arange(8)[None, None, :] + 32 * (np.arange(4)[None, :, None] >> 1)
# B: b0 rows (k) 8 tig + i, b1 32 further, col gid.
_B4_ROW = 8 * _TIG[:, None, None] + np.arange(8)[None, None, :] + 32 * np.arange(2)[None, :, None]
_B4_COL = _GID[:, None, None] + 0 * _B4_ROW
# C is laid out as for every m16n8 shape (w4a8.emulate.mma_c_lanes).


def _nibbles(regs):
    """uint32 registers [..., R] -> signed 4-bit values [..., R, 8] (nibble 0 = lowest)."""
    v = (np.asarray(regs, np.uint32)[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    return v.astype(np.int64) - 16 * (v >= 8)


def mma_m16n8k64_s4(a, b, c):
    """D = A B + C of mma.m16n8k64.row.col.s32.s4.s4.s32 for a batch of warps: a uint32 [batch, 32, 4],
    b uint32 [batch, 32, 2], c int32 [batch, 32, 4] -> int32 [batch, 32, 4] (wrapping)."""
    batch = a.shape[0]
    A = np.zeros((batch, 16, 64), np.int64)
    B = np.zeros((batch, 64, 8), np.int64)
    A[:, _A4_ROW, _A4_COL] = _nibbles(a)
    B[:, _B4_ROW, _B4_COL] = _nibbles(b)
    return wrap32(mma_c_lanes(A @ B) + np.asarray(c, np.int64))


def unpack_int4x8(ctx: Ctx, w):
    """8 packed nibbles -> (b0, b1) of sign-extended bytes, as qk::unpack_int4x8 computes them."""
    u = np.asarray(w, np.uint32) ^ np.uint32(0x88888888)
    lo = u & np.uint32(0x0F0F0F0F)
    hi = (u >> np.uint32(4)) & np.uint32(0x0F0F0F0F)
    e0, e1 = byte_perm(lo, hi, 0x5140), byte_perm(lo, hi, 0x7362)
    bias = np.uint32(0x78787878)
    flip = np.uint32(0) if "no_sign" in ctx.mutations else np.uint32(0x80808080)
    with np.errstate(over="ignore"):
        return (e0 + bias) ^ flip, (e1 + bias) ^ flip


# ----------------------------------------------------------------------------- main loops


def _threads():
    tid = np.arange(THREADS)
    lane, warp = tid & 31, tid >> 5
    return tid, lane >> 2, lane & 3, (warp >> 1) * WM, (warp & 1) * WN


def _load16(ctx: Ctx, ptr, row, col, valid, stride, what):
    """16-byte global loads of (row, col) for the valid threads, zeros for the others."""
    out = np.zeros((row.shape[0], 16), np.uint8)
    if valid.any():
        out[valid] = ctx.mem.load(ptr, row[valid] * stride + col[valid], 16, what)
    return out


def _frag8(sm: Shared, tid, base, row, off, stride, tag, what):
    """8 bytes of a padded shared row as (low word, high word)."""
    b = sm.read(tid, base + row * stride + off, 8, tag, what)
    w = np.ascontiguousarray(b).view(np.uint32)
    return w[:, 0], w[:, 1]


def _a_regs(ctx: Ctx, sm, tid, gid, tig, wm, ks, tag, what):
    """A fragments [THREADS, MT, 4] of one k step (rows gid and gid + 8, 8 bytes at 8 tig)."""
    a = np.zeros((THREADS, MT, 4), np.uint32)
    for mt in range(MT):
        lo = _frag8(sm, tid, 0, wm + mt * 16 + gid, ks * 32 + 8 * tig, A_STRIDE, tag, what)
        hi = _frag8(sm, tid, 0, wm + mt * 16 + gid + 8, ks * 32 + 8 * tig, A_STRIDE, tag, what)
        a[:, mt] = np.stack([lo[0], hi[0], lo[1], hi[1]], -1)
    if "swap_a" in ctx.mutations:
        a = a[..., [0, 2, 1, 3]]
    return a


def _mma_all(P, a, b, s4: bool):
    """Every warp's MT x NT products of one k step: P [THREADS, MT, NT, 4] updated."""
    for mt in range(MT):
        for nt in range(NT):
            aw = a[:, mt].reshape(THREADS // 32, 32, 4)
            bw = b[:, nt].reshape(THREADS // 32, 32, 2)
            cw = P[:, mt, nt].reshape(THREADS // 32, 32, 4)
            d = mma_m16n8k64_s4(aw, bw, cw) if s4 else mma_m16n8k32(aw, bw, cw)
            P[:, mt, nt] = d.reshape(THREADS, 4)


def stage_load(ctx: Ctx, ptr, r0: int, rows: int, c0: int, cols: int, width: int, what: str, row_bound: bool = True):
    """Global -> registers: this thread's 16-byte pieces of a stage of 64 rows x ``width`` bytes at
    row r0, byte c0 of a [rows, cols] byte matrix; rows past ``rows`` and bytes past ``cols`` read as
    zeros.  The staging of every 64 x 64 kernel (quik::load_rows, qk::load_stage, zq::load_bytes,
    zq::load_stage): piece idx = tid + i * THREADS is row idx / (width / 16), column (idx % (width / 16)) * 16."""
    tid = np.arange(THREADS)
    regs = []
    for i in range(BM * width // 16 // THREADS):
        idx = tid + i * THREADS
        row, col = r0 + idx // (width // 16), c0 + (idx % (width // 16)) * 16
        valid = (row < rows) & (col < cols) if row_bound else (col < cols)
        regs.append(_load16(ctx, ptr, row, col, valid, cols, what))
    return regs


def stage_store(sm: Shared, regs, base: int, stride: int, width: int, tag: int, what: str):
    """Registers -> the padded shared rows (16-byte stores; row stride ``stride`` bytes)."""
    tid = np.arange(THREADS)
    for i, r in enumerate(regs):
        idx = tid + i * THREADS
        sm.write(tid, base + (idx // (width // 16)) * stride + (idx % (width // 16)) * 16, r, tag, what)


def run_stages(ctx: Ctx, sm: Shared, n_stages: int, load, store, kstep):
    """The register-staged pipeline of every 64 x 64 main loop: store stage s, barrier, issue the
    loads of stage s + 1, the k steps of stage s (``kstep(s, ks)``; it returns False to stop the
    stage early), barrier."""
    regs = load(0)
    for s in range(n_stages):
        store(regs, s)
        sm.barrier()
        if s + 1 < n_stages:
            regs = load(s + 1)
        for ks in range(BK // 32):
            if kstep(s, ks) is False:
                break
        if "no_tail_sync" not in ctx.mutations:
            sm.barrier()
    ctx.conflicts.update({k: max(v, ctx.conflicts.get(k, 1)) for k, v in sm.conflicts.items()})


def mainloop_bytes(ctx: Ctx, s4: bool, M: int, N: int, KB: int, bm: int, bn: int):
    """quik::mainloop_bytes: both operands rows of KB bytes (int8, or packed int4 pairs)."""
    tid, gid, tig, wm, wn = _threads()
    sb = BM * A_STRIDE
    sm = Shared(sb + BN * A_STRIDE)
    P = np.zeros((THREADS, MT, NT, 4), np.int32)
    bound = "no_row_bound" not in ctx.mutations

    def load(s):                                                          # [quik::load_rows] x 2
        return (stage_load(ctx, ctx.args["xq"], bm, M, s * BK, KB, BK, "xq rows", bound),
                stage_load(ctx, ctx.args["qw"], bn, N, s * BK, KB, BK, "qw rows", bound))

    def store(regs, s):                                                   # [quik::store_rows] x 2
        stage_store(sm, regs[0], 0, A_STRIDE, BK, s, "bytes A STS.128")
        stage_store(sm, regs[1], sb, A_STRIDE, BK, s, "bytes B STS.128")

    def kstep(s, ks):
        if s * BK + ks * 32 >= KB:
            return False  # the zero half of a last stage (KB % 64 == 32)
        a = _a_regs(ctx, sm, tid, gid, tig, wm, ks, s, "bytes A LDS.64")
        b = np.zeros((THREADS, NT, 2), np.uint32)
        boff = 4 * tig if "b_offset" in ctx.mutations else 8 * tig
        for nt in range(NT):
            b[:, nt] = np.stack(_frag8(sm, tid, sb, wn + nt * 8 + gid, ks * 32 + boff, A_STRIDE, s, "bytes B LDS.64"), -1)
        if "b_swap" in ctx.mutations:
            b = b[..., ::-1]
        _mma_all(P, a, b, s4)

    run_stages(ctx, sm, -(-KB // BK), load, store, kstep)
    return P


def group_steps(Kp: int, group_size: int, fold):
    """The main loops' group count: after every k step below Kp (a step past Kp, the zero half of
    a last stage, does not count), the step that closes a group calls ``fold(j, P)``."""
    state = {"step": 0, "group": 0}

    def after(s: int, ks: int, P) -> None:
        if s * BK + ks * 32 < Kp:
            state["step"] += 1
            if state["step"] == group_size // 32:
                fold(state["group"], P)
                state["step"], state["group"] = 0, state["group"] + 1

    return after


def mainloop_w4(ctx: Ctx, M: int, N: int, Kp: int, bm: int, bn: int, group_size: int | None = None, fold=None):
    """qk::mainloop: int8 activations [M, Kp] against packed int4 [N, Kp / 2]; ``fold(j, P)`` closes
    group j (w4a8_gemm.cu's FoldInt / FoldFloat), none for quik::NoFold (one group spanning Kp)."""
    tid, gid, tig, wm, wn = _threads()
    sb = BM * A_STRIDE
    sm = Shared(sb + BN * B_STRIDE)
    P = np.zeros((THREADS, MT, NT, 4), np.int32)
    after = group_steps(Kp, group_size, fold) if fold is not None else None

    def load(s):                                                          # [qk::load_stage]
        return (stage_load(ctx, ctx.args["xq"], bm, M, s * BK, Kp, BK, "xq stage", "no_row_bound" not in ctx.mutations),
                stage_load(ctx, ctx.args["qw"], bn, N, s * BK // 2, Kp // 2, BK // 2, "qw stage"))

    def store(regs, s):                                                   # [qk::store_stage]
        stage_store(sm, regs[0], 0, A_STRIDE, BK, s, "w4 A STS.128")
        stage_store(sm, regs[1], sb, B_STRIDE, BK // 2, s, "w4 B STS.128")

    def kstep(s, ks):
        a = _a_regs(ctx, sm, tid, gid, tig, wm, ks, s, "w4 A LDS.64")
        b = np.zeros((THREADS, NT, 2), np.uint32)
        for nt in range(NT):
            w = np.ascontiguousarray(sm.read(tid, sb + (wn + nt * 8 + gid) * B_STRIDE + ks * 16 + 4 * tig, 4, s,
                                             "w4 B LDS.32")).view(np.uint32)[:, 0]
            b[:, nt] = np.stack(unpack_int4x8(ctx, w), -1)
        _mma_all(P, a, b, s4=False)
        if after is not None:
            after(s, ks, P)

    run_stages(ctx, sm, -(-Kp // BK), load, store, kstep)
    return P


# ----------------------------------------------------------------------------- epilogues


def _c(ctx: Ctx, P):
    return P[..., [0, 2, 1, 3]] if "c_map" in ctx.mutations else P


def _load(ctx: Ctx, ptr, idx, dtype, what):
    """One scalar of ``dtype`` per index (the __ldg loads)."""
    width = np.dtype(dtype).itemsize
    idx = np.asarray(idx, np.int64)
    if idx.size == 0:
        return np.zeros(0, dtype)
    return np.ascontiguousarray(ctx.mem.load(ptr, idx * width, width, what)).view(dtype)[:, 0]


def column_values(ctx: Ctx, ptr, n, N: int, dtype, what: str) -> list:
    """The epilogues' per-column loads ``n + h < N ? p[n + h] : 0`` (h = 0, 1), one value per thread."""
    out = []
    for h in range(2):
        v = np.zeros(THREADS, dtype)
        inside = n + h < N
        v[inside] = _load(ctx, ptr, n[inside] + h, dtype, what)
        out.append(v)
    return out


def fragment_outputs(M: int, N: int, bm: int, bn: int):
    """The epilogues' walk over a thread's C fragments: per n8 tile, its first column n (the pair
    n, n + 1) and the rows (mt, h, m, t) of m16 tile mt, half h (row gid + 8 h) that have threads
    inside M x N (``t`` selects them)."""
    tid, gid, tig, wm, wn = _threads()
    for nt in range(NT):
        n = bn + wn + nt * 8 + 2 * tig
        rows = []
        for mt in range(MT):
            for h in range(2):
                m = bm + wm + mt * 16 + gid + 8 * h
                t = (m < M) & (n < N)
                if t.any():
                    rows.append((mt, h, m, t))
        yield nt, n, rows


def store_acc_pair(ctx: Ctx, m, n, N: int, a0, a1):
    """The debug accumulator pair: acc_out[m, n] = a0, acc_out[m, n + 1] = a1 where n + 1 < N."""
    for c, v in enumerate((a0, a1)):
        sel = n + c < N
        ctx.mem.store(ctx.args["acc_out"], (m[sel] * N + n[sel] + c) * 4,
                      np.asarray(v)[sel].astype(np.int32).view(np.uint8).reshape(-1, 4), "acc_out")


def quik_epilogue(ctx: Ctx, P, bf16: bool, M: int, N: int, bm: int, bn: int):
    """quik::epilogue: y = ((float(acc) * (s[m] * ws[n])) + (z[m] * (ws[n] * float(R[n])))) + y_out."""
    a, f = ctx.args, ctx.fops
    P = _c(ctx, P)
    conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
    for nt, n, rows in fragment_outputs(M, N, bm, bn):
        ws = column_values(ctx, a["wscale"], n, N, np.float32, "wscale")
        wr = [f.mul(w, f.i2f(r)) for w, r in zip(ws, column_values(ctx, a["wsum"], n, N, np.int32, "wsum"))]
        for mt, h, m, t in rows:
            sm_, zm = _load(ctx, a["s"], m[t], np.float32, "s"), _load(ctx, a["z"], m[t], np.float32, "z")
            out = []
            for c in range(2):
                v = quik_value(f, P[t, mt, nt, 2 * h + c], sm_, zm, ws[c][t], wr[c][t])
                if a["y_out"]:
                    add = n[t] + c < N
                    yo = _load(ctx, a["y_out"], m[t][add] * N + n[t][add] + c, np.uint16, "y_out")
                    v[add] = f.add(v[add], f.f(conv(yo)))
                out.append(f32_to_bits16(v, bf16))
            store_pair(ctx, m[t], n[t], N, out[0], out[1])
            if a["acc_out"]:
                store_acc_pair(ctx, m[t], n[t], N, P[t, mt, nt, 2 * h], P[t, mt, nt, 2 * h + 1])


def quik_value(f: FloatOps, acc, sm, zm, ws, wr):
    """quik::value: (float(acc) * (s[m] * ws[n])) + (z[m] * wr[n]), each operation rounded once."""
    return f.add(f.mul(f.i2f(acc), f.mul(sm, ws)), f.mul(zm, wr))


def _rshift_round(v, s):
    """illm::rshift_round: (v + 2^(s-1)) >> s for s > 0, else v (int64)."""
    v, s = np.asarray(v, np.int64), np.asarray(s, np.int64)
    sp = np.maximum(s, 1)
    return np.where(s > 0, (v + (np.int64(1) << (sp - 1))) >> sp, v)


def _illm_kmin(ctx: Ctx, n):
    """Each column's segment kmin, kmin_p[(n >= n1) + (n >= n2)] (a joined DI-MatMul's segments; one
    layer: n1 = n2 = N)."""
    a = ctx.args
    seg = (n >= a["n1"]).astype(np.int64) + (n >= a["n2"])
    if "kmin_first_segment" in ctx.mutations:
        seg = np.zeros_like(seg)
    return _load(ctx, a["kmin_p"], seg, np.int32, "kmin").astype(np.int64)


def illm_epilogue(ctx: Ctx, P, M: int, N: int, bm: int, bn: int):
    """illm::matmul_epilogue: t = rshift_round(acc * wm[n], wk[n] - kmin of n's segment), int64."""
    a = ctx.args
    tid, gid, tig, wmo, wno = _threads()
    P = _c(ctx, P)
    for nt in range(NT):
        for c in range(2):
            n = bn + wno + nt * 8 + 2 * tig + c
            inside = n < N
            m_n = np.zeros(THREADS, np.int64)
            s = np.zeros(THREADS, np.int64)
            m_n[inside] = _load(ctx, a["wm"], n[inside], np.int32, "wm")
            s[inside] = _load(ctx, a["wk"], n[inside], np.int32, "wk").astype(np.int64) - _illm_kmin(ctx, n[inside])
            for mt in range(MT):
                for h in range(2):
                    m = bm + wmo + mt * 16 + gid + 8 * h
                    t = inside & (m < M)
                    if t.any():
                        v = _rshift_round(P[t, mt, nt, 2 * h + c].astype(np.int64) * m_n[t], s[t])
                        ctx.mem.store(a["t"], (m[t] * N + n[t]) * 8, v.view(np.uint8).reshape(-1, 8), "t")


def illm_segments(ctx: Ctx) -> int:
    """How many column segments a DI-MatMul launch has: 1 + (n1 < N) + (n2 < N)."""
    a = ctx.args
    return 1 + int(a["n1"] < a["N"]) + int(a["n2"] < a["N"])


def illm_row_exponents(ctx: Ctx, M: int, bm: int):
    """illm::matmul_row_exponents (the first column tile's CTAs): tk[g, m] = xk[m] + kmin[g] for its
    rows, for each column segment g."""
    a = ctx.args
    rows = np.arange(bm, min(bm + BM, M), dtype=np.int64)
    xk = _load(ctx, a["xk"], rows, np.int64, "xk").astype(np.int64)
    for g in range(illm_segments(ctx)):
        kmin = int(_load(ctx, a["kmin_p"], np.array([g], np.int64), np.int32, "kmin")[0])
        if "tk_no_kmin" in ctx.mutations:
            kmin = 0
        v = xk + kmin
        ctx.mem.store(a["tk"], (g * M + rows) * 8, v.view(np.uint8).reshape(-1, 8), "tk")


class GroupFold:
    """The group folds of the native W4A8 and FP4 GEMMs: w4a8_gemm.cu's FoldInt (A += iscale[n, j] * P,
    int32 wrapping), FoldFloat (acc = acc + float(P) * float(scales[n, j])) and fp8_gemm.cu's
    FoldPow2 (acc = acc + fl32(P) * 2^sexp[n, j]), two roundings for the float ones, the next
    group's scales loaded after a fold.  ``scale_of(flat [N, G] indices)`` loads and decodes the
    scales; ``stale`` names the mutation that reloads the folded group's scales instead."""

    def __init__(self, ctx: Ctx, integer: bool, N: int, G: int, bn: int, scale_of, stale: str):
        tid, gid, tig, wm, wn = _threads()
        self.ctx, self.is_int, self.N, self.G = ctx, integer, N, G
        self.scale_of, self.stale = scale_of, stale
        self.col0 = bn + wn + 2 * tig
        self.acc = np.zeros((THREADS, MT, NT, 4), np.int32 if integer else np.float32)
        self.sc = np.zeros((THREADS, NT, 2), self.acc.dtype)
        self.load_scales(0)

    def load_scales(self, j: int):                                        # [qk::Fold*::load_scales]
        for nt in range(NT):
            for h in range(2):
                n = self.col0 + nt * 8 + h
                inside = (n < self.N) & (j < self.G)
                self.sc[:, nt, h] = 0
                self.sc[inside, nt, h] = self.scale_of(n[inside] * self.G + j)

    def __call__(self, j: int, P):
        f = self.ctx.fops
        for i in range(4):
            sc = self.sc[:, None, :, i & 1]
            if self.is_int:
                self.acc[..., i] = wrap32(self.acc[..., i].astype(np.int64) + sc.astype(np.int64) * P[..., i].astype(np.int64))
            else:  # P to float32 (exact for the int32 partials, once rounded for the FP8 ones)
                self.acc[..., i] = f.add(self.acc[..., i], f.mul(f.f(P[..., i].astype(np.float32)), sc))
        P[...] = 0
        self.load_scales(j if self.stale in self.ctx.mutations else j + 1)


def native_fold(ctx: Ctx, integer: bool, N: int, G: int, bn: int) -> GroupFold:
    """FoldInt (iscale int32 [N, G]) or FoldFloat (scales fp16 [N, G]) of w4a8_gemm.cu."""
    if integer:
        scale_of = lambda idx: _load(ctx, ctx.args["iscale"], idx, np.int32, "iscale")  # noqa: E731
    else:
        scale_of = lambda idx: f16_bits_to_f32(_load(ctx, ctx.args["scales"], idx, np.uint16, "scales"))  # noqa: E731
    return GroupFold(ctx, integer, N, G, bn, scale_of, "fold_stale")


def native_epilogue(ctx: Ctx, fold: GroupFold, bf16: bool, M: int, N: int, bm: int, bn: int):
    """qk::is_gemm's y = float(A) * (t[m] * (cscale[n] * 2^-a)) (and A to acc_out), or qk::fs_gemm's
    y = acc * t[m]; each product rounded."""
    a, f = ctx.args, ctx.fops
    acc = _c(ctx, fold.acc)
    for nt, n, rows in fragment_outputs(M, N, bm, bn):
        if fold.is_int:  # cscale * 2^-a: exact
            cs = [f.mul(v, np.float32(2.0 ** -a["alpha_log2"])) for v in column_values(ctx, a["cscale"], n, N, np.float32, "cscale")]
        for mt, h, m, t in rows:
            tm = _load(ctx, a["t"], m[t], np.float32, "t")
            if fold.is_int:
                ys = [f.mul(f.i2f(acc[t, mt, nt, 2 * h + c]), f.mul(tm, cs[c][t])) for c in range(2)]
            else:
                ys = [f.mul(acc[t, mt, nt, 2 * h + c], tm) for c in range(2)]
            store_pair(ctx, m[t], n[t], N, f32_to_bits16(ys[0], bf16), f32_to_bits16(ys[1], bf16))
            if fold.is_int and a["acc_out"]:
                store_acc_pair(ctx, m[t], n[t], N, acc[t, mt, nt, 2 * h], acc[t, mt, nt, 2 * h + 1])


# ----------------------------------------------------------------------------- split and quantize


def split_rows(ctx: Ctx, grid, bf16: bool):
    """quik::split_row for every row (one CTA of 256 threads per row; min / max are order-free)."""
    a, f, mem = ctx.args, ctx.fops, ctx.mem
    M, K, Kb, Kbp, n_out, bits, pack, clip = (a[k] for k in ("M", "K", "Kb", "Kbp", "n_out", "bits", "pack", "clip"))
    if "no_clip" in ctx.mutations:
        clip = np.float32(1)
    conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
    levels = np.float32((1 << bits) - 1)
    half = 1 << (bits - 1)
    base = _load(ctx, a["base_idx"], np.arange(Kb), np.int32, "base_idx").astype(np.int64)
    outl = _load(ctx, a["outlier_idx"], np.arange(n_out), np.int32, "outlier_idx").astype(np.int64)
    for m in range(min(grid[0], M)):
        v = f.f(conv(_load(ctx, a["x"], m * K + base, np.uint16, "x (base channels)")))
        lo = np.float32(np.fmin.reduce(v, initial=np.inf))
        hi = np.float32(np.fmax.reduce(v, initial=-np.inf))
        lo, hi = f.mul(lo, clip), f.mul(hi, clip)
        r = f.add(hi, -lo)
        inv = f.mul(f.rcp(r), levels) if r > 0 else np.float32(0)
        u = np.fmin(np.fmax(np.rint(f.mul(f.add(v, -lo), inv)), np.float32(0)), levels)
        width = Kb if "split_short" in ctx.mutations else Kbp
        code = np.zeros(Kbp, np.int64)
        code[:Kb] = u.astype(np.int64) - half
        if pack:
            j = np.arange(width // 2)
            byte = (code[2 * j] & 0xF) | ((code[2 * j + 1] & 0xF) << 4)
            mem.store(a["xq"], m * (Kbp // 2) + j, byte.astype(np.uint8)[:, None], "xq (packed)")
        else:
            k = np.arange(width)
            mem.store(a["xq"], m * Kbp + k, code[k].astype(np.int8).view(np.uint8)[:, None], "xq")
        split_row_tail(ctx, m, outl if n_out else None, r, lo, levels, half)


def split_row_tail(ctx: Ctx, m: int, outl, r, lo, levels, half: int):
    """Both split kernels' end of row m: its outlier channels copied to x_out (``outl`` their
    indices, None for no x_out), s = r / L and z = lo + s 2^(b-1)."""
    a, f, mem = ctx.args, ctx.fops, ctx.mem
    if outl is not None:
        n_out = outl.size
        xo = _load(ctx, a["x"], m * a["K"] + outl, np.uint16, "x (outlier channels)")
        mem.store(a["x_out"], (m * n_out + np.arange(n_out)) * 2, xo.view(np.uint8).reshape(-1, 2), "x_out")
    sc = f.div(r, levels)
    mem.store(a["s"], np.array([m * 4]), np.asarray([sc], np.float32).view(np.uint8)[None, :], "s")
    zz = f.add(lo, f.mul(sc, np.float32(half)))
    mem.store(a["z"], np.array([m * 4]), np.asarray([zz], np.float32).view(np.uint8)[None, :], "z")


def split_wide(ctx: Ctx, grid, bf16: bool):
    """quik_split_wide's CTAs: b < M the row split (quik::split_wide_row: thread t's register slots
    j hold channels 2p, 2p + 1 of pair p = t + WIDE_THREADS j; min / max are order-free), b >= M the
    outlier product's column CTAs (quik::outlier_columns)."""
    a, f, mem = ctx.args, ctx.fops, ctx.mem
    M, K, Kb, Kbp, n_out, bits, pack, clip = (a[k] for k in ("M", "K", "Kb", "Kbp", "n_out", "bits", "pack", "clip"))
    conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
    levels = np.float32((1 << bits) - 1)
    half = 1 << (bits - 1)
    slots = WIDE_SLOTS - 1 if "wide_slots" in ctx.mutations else WIDE_SLOTS
    if "no_clip" in ctx.mutations:
        clip = np.float32(1)
    p = np.arange(WIDE_THREADS)[:, None] + WIDE_THREADS * np.arange(slots)[None, :]   # [t, j]
    for m in range(min(grid[0], M)):
        v, inside = [], []
        for h in range(2):                                                         # the register loads
            k = 2 * p + h
            ok = k < Kb
            vals = np.zeros(k.shape, np.float32)
            idx = _load(ctx, a["base_idx"], k[ok], np.int32, "base_idx").astype(np.int64)
            vals[ok] = f.f(conv(_load(ctx, a["x"], m * K + idx, np.uint16, "x (base channels)")))
            v.append(vals)
            inside.append(ok)
        lo = np.float32(min([np.fmin.reduce(vv[ok], initial=np.inf) for vv, ok in zip(v, inside)]))
        hi = np.float32(max([np.fmax.reduce(vv[ok], initial=-np.inf) for vv, ok in zip(v, inside)]))
        lo, hi = f.mul(lo, clip), f.mul(hi, clip)
        r = f.add(hi, -lo)
        inv = f.mul(f.rcp(r), levels) if r > 0 else np.float32(0)
        codes = []
        for h in range(2):
            u = np.fmin(np.fmax(np.rint(f.mul(f.add(v[h], -lo), inv)), np.float32(0)), levels)
            codes.append(np.where(inside[h], u.astype(np.int64) - half, 0))
        if "wide_pair_swap" in ctx.mutations:
            codes.reverse()
        st = 2 * p < (Kb if "split_short" in ctx.mutations else Kbp)              # if (k0 >= Kbp) continue
        if pack:
            byte = (codes[0] & 0xF) | ((codes[1] & 0xF) << 4)
            mem.store(a["xq"], m * (Kbp // 2) + p[st], byte[st].astype(np.uint8)[:, None], "xq (packed)")
        else:
            word = (codes[0] & 0xFF) | ((codes[1] & 0xFF) << 8)
            mem.store(a["xq"], m * Kbp + 2 * p[st], word[st].astype(np.uint16).view(np.uint8).reshape(-1, 2), "xq")
        outl = (_load(ctx, a["outlier_idx"], np.arange(n_out), np.int32, "outlier_idx").astype(np.int64)
                if a["x_out"] and n_out else None)
        split_row_tail(ctx, m, outl, r, lo, levels, half)
    if grid[0] > M:
        outlier_columns(ctx, range(grid[0] - M), bf16)


def outlier_columns(ctx: Ctx, ctas, bf16: bool):
    """quik::outlier_columns for the product CTAs ``ctas``: the M rows' outlier channels gathered
    into shared memory (each entry written once, read only once written), then warp w of CTA c
    makes column n = GEMV_COLS c + w: lane l sums channels l, l + 32, ... (each product and sum
    rounded to float32), the xor butterfly adds the lane sums, lane r stores row r."""
    a, f, mem = ctx.args, ctx.fops, ctx.mem
    M, K, N, n_out = a["M"], a["K"], a["N"], a["n_out"]
    conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
    if not (0 < M <= FUSED_ROWS and 0 < n_out <= FUSED_MAX_OUT):
        raise EmulationError(f"outlier product with M={M}, n_out={n_out}: the kernel holds {FUSED_ROWS} rows and "
                             f"{FUSED_MAX_OUT} channels")
    outl = _load(ctx, a["outlier_idx"], np.arange(n_out), np.int32, "outlier_idx").astype(np.int64)
    sx = np.full((FUSED_ROWS, FUSED_MAX_OUT), np.nan, np.float32)                   # unwritten: NaN
    written = np.zeros(sx.shape, np.int32)
    r, k = np.repeat(np.arange(M), n_out), np.tile(np.arange(n_out), M)             # thread k < n_out: every row r
    sx[r, k] = f.f(conv(_load(ctx, a["x"], r * K + outl[k], np.uint16, "x (outlier channels)")))
    np.add.at(written, (r, k), 1)
    if (written[:M, :n_out] != 1).any():
        raise EmulationError("outlier product: the shared rows are not written once each")
    lane = np.arange(32)
    for c in ctas:
        n = GEMV_COLS * c + np.arange(GEMV_COLS)                                    # one column per warp
        n = n[n < N]
        if not n.size:
            continue
        acc = np.zeros((FUSED_ROWS, n.size, 32), np.float32)
        if "outlier_seq" in ctx.mutations:                                          # one running sum
            for kk in range(n_out):
                w = f.f(f16_bits_to_f32(_load(ctx, a["w_out"], n * n_out + kk, np.uint16, "w_out")))
                acc[:M, :, 0] = f.add(acc[:M, :, 0], f.mul(sx[:M, kk, None], w[None, :]))
            total = acc[:, :, 0]
        else:
            for s0 in range(0, n_out, 32):
                kk = s0 + lane
                ok = kk < n_out
                w = np.zeros((n.size, 32), np.float32)
                w[:, ok] = f.f(f16_bits_to_f32(_load(ctx, a["w_out"], (n[:, None] * n_out + kk[None, ok]).reshape(-1),
                                                     np.uint16, "w_out"))).reshape(n.size, -1)
                if (written[:M, kk[ok]] != 1).any():
                    raise EmulationError("outlier product: a shared entry read before it was written")
                prod = f.mul(sx[:M, None, kk[ok]], w[None, :, ok])
                acc[:M, :, ok] = f.add(acc[:M, :, ok], prod)
            for o in (16, 8, 4, 2, 1):
                acc = f.add(acc, acc[:, :, lane ^ o])
            total = acc[:, :, 0]
        bits16 = f32_to_bits16(total[:M], bf16)                                     # [M, n]
        rows = np.repeat(np.arange(M), n.size)
        mem.store(a["y_out"], (rows * N + np.tile(n, M)) * 2, bits16.reshape(-1).view(np.uint8).reshape(-1, 2), "y_out")


def gemv_warps(N: int, grid):
    """quik::gemv_n0 for every warp of the launch that has columns: (warp id, n0)."""
    for b in range(grid[0]):
        for w in range(GV_WARPS):
            n0 = (b * GV_WARPS + w) * GV_COLS
            if n0 < N:
                yield b * GV_WARPS + w, n0


def _vsub4(a, b):
    """__vsub4: bytewise a - b modulo 256 (no borrow between bytes)."""
    a, b = np.asarray(a, np.uint32), np.asarray(b, np.uint32)
    out = np.zeros(np.broadcast(a, b).shape, np.uint32)
    for i in range(4):
        sh = np.uint32(8 * i)
        out |= (((a >> sh) - (b >> sh)) & np.uint32(0xFF)) << sh
    return out


def _dp4a(a, b):
    """__dp4a without its addend: the sum of the four signed byte products of two words (int64)."""
    sa = np.asarray(a, np.uint32)[..., None].view(np.uint8).reshape(np.shape(a) + (4,)).view(np.int8)
    sb = np.asarray(b, np.uint32)[..., None].view(np.uint8).reshape(np.shape(b) + (4,)).view(np.int8)
    return (sa.astype(np.int64) * sb.astype(np.int64)).sum(axis=-1)


def gemv_sums(ctx: Ctx, xq_ptr: int, qw_ptr: int, M: int, N: int, KB: int, n0: int, w4: bool = False):
    """quik::gemv_sums<w4> for one warp: lane l takes the 16-byte weight chunks l, l + 32, ... of its
    GV_COLS weight rows (KB bytes each; a column past N reads row n0 again) and the activation
    chunks they multiply (16-byte loads, each checked), and the xor butterfly adds the lanes.
    int8 weights: activation chunk c, dp4a of the bytes.  Packed int4 (``w4``): activation chunks
    2c, 2c + 1, and per weight word the kernel's instructions: the even k's nibbles (w & 0x0F0F0F0F)
    and the odd k's (w >> 4 & 0x0F0F0F0F), xor 8 and __vsub4 8 (sign), against PRMT 0x6420 / 0x7531
    of the word's two activation words, summed with dp4a.  Returns acc int64 [GV_ROWS, GV_COLS, 32]
    (every lane's registers)."""
    mem = ctx.mem
    chunks = KB // 16
    step = 16 if "gemv_stride" in ctx.mutations else 32
    lane = np.arange(32)
    k = lane[:, None] + step * np.arange(-(-chunks // 32))[None, :]                 # [lane, i]
    ok = k < chunks
    per_x = 2 if w4 else 1                                                          # activation chunks per weight chunk
    xs = [np.concatenate([mem.load(xq_ptr, ((m * chunks + k[ok]) * per_x + h) * 16, 16, "xq (16-byte chunks)")
                          for h in range(per_x)], axis=1) for m in range(M)]
    sign = 0 if "gemv4_no_sign" in ctx.mutations else 0x08080808
    sel = (0x7531, 0x6420) if "gemv4_perm" in ctx.mutations else (0x6420, 0x7531)
    acc = np.zeros((GV_ROWS, GV_COLS, 32), np.int64)
    for c in range(GV_COLS):
        row = n0 + c if n0 + c < N else n0
        w = mem.load(qw_ptr, (row * chunks + k[ok]) * 16, 16, "qw (16-byte chunks)")
        if w4:
            w = w.view(np.uint32)                                                   # [chunk, 4 words]
            even = _vsub4((w & np.uint32(0x0F0F0F0F)) ^ np.uint32(sign), np.uint32(sign))
            odd = _vsub4(((w >> np.uint32(4)) & np.uint32(0x0F0F0F0F)) ^ np.uint32(sign), np.uint32(sign))
        for m in range(M):
            if w4:
                xw = xs[m].view(np.uint32)                                          # [chunk, 8 words]
                x_lo, x_hi = xw[:, 0::2], xw[:, 1::2]                               # word i's x0..3, x4..7
                per_chunk = (_dp4a(byte_perm(x_lo, x_hi, sel[0]), even) + _dp4a(byte_perm(x_lo, x_hi, sel[1]), odd)).sum(axis=1)
            else:
                per_chunk = (xs[m].view(np.int8).astype(np.int64) * w.view(np.int8).astype(np.int64)).sum(axis=1)
            per = np.zeros(k.shape, np.int64)
            per[ok] = per_chunk                                                     # 4 (8 for w4) dp4a per chunk
            acc[m, c] = wrap32(per.sum(axis=1))
    for o in (16, 8, 4, 2, 1):
        acc = wrap32(acc + acc[:, :, lane ^ o]).astype(np.int64)
    return acc


def gemv_outputs(ctx: Ctx, acc, M: int, N: int, n0: int):
    """quik::gemv_pick and the storing lanes: (m, n, the lane's sum) for lane j < GV_ROWS GV_COLS
    with m = j / GV_COLS < M and n = n0 + j % GV_COLS < N."""
    for j in range(GV_ROWS * GV_COLS):
        m, c = j // GV_COLS, j % GV_COLS
        if m >= M or n0 + c >= N:
            continue
        sel = (j % GV_ROWS, j // GV_ROWS) if "gemv_lane_map" in ctx.mutations else (m, c)
        yield m, n0 + c, int(acc[sel[0], sel[1], j])


def gemv_quik(ctx: Ctx, grid, bf16: bool, w4: bool):
    """quik::gemv_quik: the GEMV sums (``w4``: packed int4 weights against the codes one per byte),
    then quik::epilogue's formula for each stored output."""
    a, f, mem = ctx.args, ctx.fops, ctx.mem
    M, N = a["M"], a["N"]
    conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
    for _, n0 in gemv_warps(N, grid):
        acc = gemv_sums(ctx, a["xq"], a["qw"], M, N, a["Kbp"] // 2 if w4 else a["Kbp"], n0, w4)
        for m, n, av in gemv_outputs(ctx, acc, M, N, n0):
            ws = _load(ctx, a["wscale"], [n], np.float32, "wscale")[0]
            wr = f.mul(ws, f.i2f(_load(ctx, a["wsum"], [n], np.int32, "wsum")[0]))
            sm_, zm = _load(ctx, a["s"], [m], np.float32, "s")[0], _load(ctx, a["z"], [m], np.float32, "z")[0]
            v = quik_value(f, av, sm_, zm, ws, wr)
            if a["y_out"]:
                v = f.add(v, f.f(conv(_load(ctx, a["y_out"], [m * N + n], np.uint16, "y_out")))[0])
            mem.store(a["y"], np.array([(m * N + n) * 2]), f32_to_bits16(np.asarray([v]), bf16).view(np.uint8)[None, :], "y")
            if a["acc_out"]:
                mem.store(a["acc_out"], np.array([(m * N + n) * 4]), np.asarray([av], np.int32).view(np.uint8)[None, :],
                          "acc_out")


def epilogue_rows(ctx: Ctx, grid, bf16: bool):
    """quik::epilogue_rows (after torch._int_mm): CTA m's strided loop gives each column of acc's row m
    (rows ld apart) quik::epilogue's y, operation for operation."""
    a, f, mem = ctx.args, ctx.fops, ctx.mem
    M, N = a["M"], a["N"]
    conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
    step = N if "epi_ld_dense" in ctx.mutations else a["ld"]
    cols = np.arange(N, dtype=np.int64)
    ws = _load(ctx, a["wscale"], cols, np.float32, "wscale")
    wr = f.mul(ws, f.i2f(_load(ctx, a["wsum"], cols, np.int32, "wsum")))
    for m in range(min(grid[0], M)):
        acc = _load(ctx, a["acc"], m * step + cols, np.int32, "acc")
        sm_, zm = _load(ctx, a["s"], [m], np.float32, "s")[0], _load(ctx, a["z"], [m], np.float32, "z")[0]
        v = quik_value(f, acc, sm_, zm, ws, wr)
        if a["y_out"]:
            v = f.add(v, f.f(conv(_load(ctx, a["y_out"], m * N + cols, np.uint16, "y_out"))))
        mem.store(a["y"], (m * N + cols) * 2, f32_to_bits16(v, bf16).view(np.uint8).reshape(-1, 2), "y")


def illm_gemv(ctx: Ctx, grid, w4: bool):
    """illm_gemv_w8 / illm_gemv_w4 (``w4``): CTA 0 writes the rows' exponents; the GEMV sums, then
    matmul_epilogue's t = rshift_round(acc * wm[n], wk[n] - kmin of n's segment) for each stored output."""
    a, mem = ctx.args, ctx.mem
    M, N = a["M"], a["N"]
    if a["tk"]:
        illm_row_exponents(ctx, M, 0)
    for _, n0 in gemv_warps(N, grid):
        acc = gemv_sums(ctx, a["xq"], a["qw"], M, N, a["K"] // 2 if w4 else a["K"], n0, w4)
        for m, n, av in gemv_outputs(ctx, acc, M, N, n0):
            m_n = np.int64(_load(ctx, a["wm"], [n], np.int32, "wm")[0])
            s = np.int64(_load(ctx, a["wk"], [n], np.int32, "wk")[0]) - _illm_kmin(ctx, np.array([n]))[0]
            v = _rshift_round(np.asarray([av * m_n], np.int64), np.asarray([s], np.int64))
            mem.store(a["t"], np.array([(m * N + n) * 8]), v.view(np.uint8).reshape(-1, 8), "t")


# ----------------------------------------------------------------------------- launches


def _written_once(name, mem: Global, ptr: int, count: int, width: int, what: str):
    w = mem.writes[ptr][: count * width].reshape(count, width)
    if not (w == 1).all():
        bad = int(np.flatnonzero((w != 1).any(axis=1))[0])
        raise EmulationError(f"{name}: {what}[{bad}] written {int(w[bad].max())} times")


def begin_launch(emu, name, grid, block, args, shared_mem, kernels, known) -> tuple[tuple, Ctx]:
    """The checks every launch of a static-shared-memory kernel gets, shared by the emulators of
    this file and of fp8/emulate.py: ``kernels`` lists (name prefix, parameter names, threads).
    Returns the grid as 3 values and the launch's context (its arguments by name)."""
    unknown = set(emu.mutations) - known
    if unknown:
        raise ValueError(f"unknown mutations {sorted(unknown)}")
    grid = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
    found = [(params, threads) for prefix, params, threads in kernels if name.startswith(prefix)]
    if not found:
        raise EmulationError(f"no emulation of kernel {name}")
    params, threads = found[0]
    if tuple(block) != (threads,):
        raise EmulationError(f"{name}: launched with block {tuple(block)}, the kernel is written for {threads} threads")
    if shared_mem:
        raise EmulationError(f"{name}: {shared_mem} bytes of dynamic shared memory, the kernel uses static shared memory only")
    if len(args) != len(params):
        raise EmulationError(f"{name}: {len(args)} arguments, the kernel takes {len(params)}")
    bad = [p for p, v in zip(params, args) if isinstance(v, (float, np.floating)) and not isinstance(v, np.float32)]
    if bad:  # CuPy would pass a Python float or float64 as 8 bytes where the kernel reads a 4-byte float
        raise EmulationError(f"{name}: argument {bad[0]} is {type(args[params.index(bad[0])]).__name__}, not numpy.float32")
    vals = {p: v if isinstance(v, np.float32) else int(v) for p, v in zip(params, args)}
    emu.launches.append((name, grid, dict(vals)))
    return grid, Ctx(Global(), vals, frozenset(emu.mutations), FloatOps(False))


def check_tiles(name: str, grid, M: int, N: int) -> None:
    """A GEMM grid must be (ceil(N / 64), ceil(M / 64), 1)."""
    if grid[:2] != (-(-N // BN), -(-M // BM)) or grid[2] != 1:
        raise EmulationError(f"{name}: grid {grid} does not cover M={M}, N={N} with {BM} x {BN} tiles")


@dataclass
class StaticEmulator:
    """A launch hook for kernels with static shared memory only (this file's and fp8/emulate.py's):
    each launch is checked by ``begin_launch`` against ``KERNELS`` and run by ``run``."""

    mutations: frozenset = frozenset()
    launches: list = field(default_factory=list)
    conflicts: dict = field(default_factory=dict)
    KERNELS = ()           # (name prefix, parameter names, threads)
    KNOWN = frozenset()    # the mutations the subclass knows

    def __call__(self, name, grid, block, args, shared_mem, source):
        grid, ctx = begin_launch(self, name, grid, block, args, shared_mem, self.KERNELS, self.KNOWN)
        self.run(name, grid, ctx)
        for k, v in ctx.conflicts.items():
            self.conflicts[k] = max(v, self.conflicts.get(k, 1))

    def run(self, name: str, grid: tuple, ctx: Ctx) -> None:
        raise NotImplementedError

    @classmethod
    @contextlib.contextmanager
    def hooked(cls, **kwargs):
        """Route every kernel launch to a new emulator of this class; yields it (its ``launches`` and
        worst bank ``conflicts`` per shared-memory access site)."""
        emu = cls(**kwargs)
        with launch.launch_hook(emu):
            yield emu


class Emulator(StaticEmulator):
    """The launch hook of quik_gemm.cu's kernels, illm_gemm.cu's DI-MatMul and w4a8_gemm.cu's
    native-layout GEMMs and int8 quantizer."""

    KERNELS = (("quik_split_wide_", SPLIT_WIDE_PARAMS, WIDE_THREADS), ("quik_split_", SPLIT_PARAMS, QUANT_THREADS),
               ("quik_gemm_", GEMM_PARAMS, THREADS), ("quik_gemv_w", GEMM_PARAMS, GV_THREADS),
               ("illm_gemv_w", ILLM_PARAMS, GV_THREADS),
               ("illm_matmul_", ILLM_PARAMS, THREADS), ("quik_epilogue_rows_", EPI_PARAMS, EPI_THREADS),
               ("w4a8_is_gemm_", IS_PARAMS, THREADS),
               ("w4a8_fs_gemm_", FS_PARAMS, THREADS), ("quantize_per_token_int8_", W4A8_QUANT_PARAMS, QUANT_THREADS))
    KNOWN = MUTATIONS

    def run(self, name, grid, ctx):
        mem, vals = ctx.mem, ctx.args
        bf16 = name.endswith("_bf16")
        if name.startswith("quantize_per_token_int8_"):  # qk::quantize_row, as w4a8r_quantize runs it
            mem.track(vals["xq"])
            mem.track(vals["t"])
            quantize_rows(ctx, grid, bf16)
            _written_once(name, mem, vals["xq"], vals["M"] * vals["Kq"], 1, "xq")
            _written_once(name, mem, vals["t"], vals["M"], 4, "t")
            return
        if name.startswith("quik_split_wide_"):
            M, N = vals["M"], vals["N"]
            for key in ("xq", "s", "z", "x_out", "y_out"):
                if vals[key]:
                    mem.track(vals[key])
            cols = -(-N // GEMV_COLS) if vals["w_out"] else 0
            if grid[0] != M + cols or (vals["w_out"] != 0) != (vals["y_out"] != 0):
                raise EmulationError(f"{name}: grid {grid} for M={M} rows and {cols} product CTAs")
            split_wide(ctx, grid, bf16)
            row = vals["Kbp"] // 2 if vals["pack"] else vals["Kbp"]
            _written_once(name, mem, vals["xq"], M * row, 1, "xq")
            for key, count, width in (("s", M, 4), ("z", M, 4), ("x_out", M * vals["n_out"], 2), ("y_out", M * N, 2)):
                if count and vals[key]:
                    _written_once(name, mem, vals[key], count, width, key)
            return
        if name.startswith("quik_split_"):
            M = vals["M"]
            for key in ("xq", "s", "z", "x_out"):
                if key != "x_out" or vals["n_out"]:
                    mem.track(vals[key])
            if grid[0] != M:
                raise EmulationError(f"{name}: grid {grid} for M={M} rows")
            split_rows(ctx, grid, bf16)
            row = vals["Kbp"] // 2 if vals["pack"] else vals["Kbp"]
            _written_once(name, mem, vals["xq"], M * row, 1, "xq")
            for key, count, width in (("s", M, 4), ("z", M, 4), ("x_out", M * vals["n_out"], 2)):
                if count:
                    _written_once(name, mem, vals[key], count, width, key)
            return
        M, N = vals["M"], vals["N"]
        if name.startswith("quik_epilogue_rows_"):
            if grid != (M, 1, 1) or not 0 < N <= vals["ld"]:
                raise EmulationError(f"{name}: grid {grid} for M={M} rows, or N={N} > ld={vals['ld']}")
            mem.track(vals["y"])
            epilogue_rows(ctx, grid, bf16)
            _written_once(name, mem, vals["y"], M * N, 2, "y")
            return
        if name.startswith(("quik_gemv_w", "illm_gemv_w")):
            if grid != (-(-N // (GV_WARPS * GV_COLS)), 1, 1) or not 0 < M <= GV_ROWS:
                raise EmulationError(f"{name}: grid {grid} for M={M}, N={N} (ceil(N / {GV_WARPS * GV_COLS}) CTAs, M <= {GV_ROWS})")
            illm = name.startswith("illm_gemv_w")
            if name not in ("illm_gemv_w8", "illm_gemv_w4") and not name.startswith(("quik_gemv_w8a8_", "quik_gemv_w4a4_")):
                raise EmulationError(f"no emulation of kernel {name}")
            outs = (("t", 8),) if illm else (("y", 2), ("acc_out", 4))
            for key, _ in outs + ((("tk", 8),) if illm else ()):
                if vals[key]:
                    mem.track(vals[key])
            if illm:
                illm_gemv(ctx, grid, name == "illm_gemv_w4")
            else:
                gemv_quik(ctx, grid, bf16, name.startswith("quik_gemv_w4a4_"))
            for key, width in outs:
                if vals[key]:
                    _written_once(name, mem, vals[key], M * N, width, key)
            if illm and vals["tk"]:
                _written_once(name, mem, vals["tk"], M * illm_segments(ctx), 8, "tk")
            return
        check_tiles(name, grid, M, N)
        if name.startswith("illm_") and not 0 < vals["n1"] <= vals["n2"] <= N:
            raise EmulationError(f"{name}: segment bounds n1={vals['n1']}, n2={vals['n2']} for N={N}")
        outs = (("t", 8),) if name.startswith("illm_") else (("y", 2), ("acc_out", 4))
        if name.startswith("illm_") and vals["tk"]:
            mem.track(vals["tk"])
        for key, _ in outs:
            if vals.get(key):
                mem.track(vals[key])
        for by in range(grid[1]):
            for bx in range(grid[0]):
                bm, bn = by * BM, bx * BN
                if name.startswith("quik_gemm_w8a8"):
                    P = mainloop_bytes(ctx, False, M, N, vals["Kbp"], bm, bn)
                elif name.startswith("quik_gemm_w4a4_s4"):
                    P = mainloop_bytes(ctx, True, M, N, vals["Kbp"] // 2, bm, bn)
                elif name.startswith("quik_gemm_w4a4_s8"):
                    P = mainloop_w4(ctx, M, N, vals["Kbp"], bm, bn)
                elif name == "illm_matmul_w8":
                    P = mainloop_bytes(ctx, False, M, N, vals["K"], bm, bn)
                elif name == "illm_matmul_w4":
                    P = mainloop_w4(ctx, M, N, vals["K"], bm, bn)
                elif name.startswith("w4a8_"):
                    fold = native_fold(ctx, name.startswith("w4a8_is"), N, vals["Kp"] // vals["group_size"], bn)
                    mainloop_w4(ctx, M, N, vals["Kp"], bm, bn, vals["group_size"], fold)
                    native_epilogue(ctx, fold, bf16, M, N, bm, bn)
                    continue
                else:
                    raise EmulationError(f"no emulation of kernel {name}")
                if name.startswith("quik_gemm_"):
                    quik_epilogue(ctx, P, bf16, M, N, bm, bn)
                else:
                    illm_epilogue(ctx, P, M, N, bm, bn)
                    if bx == 0 and vals["tk"]:
                        illm_row_exponents(ctx, M, bm)
        for key, width in outs:
            if vals.get(key):
                _written_once(name, mem, vals[key], M * N, width, key)
        if name.startswith("illm_") and vals["tk"]:
            _written_once(name, mem, vals["tk"], M * illm_segments(ctx), 8, "tk")


def emulating(**kwargs):
    """Run the QUIK, DI-MatMul and native W4A8 launchers on the CPU emulator; yields the ``Emulator``."""
    return Emulator.hooked(**kwargs)


@contextlib.contextmanager
def emulating_repacked(sm_count: int = 8, mutations=frozenset(), w4_mutations=frozenset()):
    """The 4-bit "s8r" path on the CPU: quik_split on this file's emulator, w4a8r_decode_quik_m* and
    w4a8r_prefill_quik on the repacked W4A8 emulator (w4a8/emulate.py); yields (this emulator, that one)."""
    from qconvert_kernels.w4a8 import emulate as w4emu

    quik, w4 = Emulator(mutations=frozenset(mutations)), w4emu.Emulator(mutations=frozenset(w4_mutations))

    def hook(name, grid, block, args, shared_mem, source):
        (w4 if name.startswith("w4a8r_") else quik)(name, grid, block, args, shared_mem, source)

    with launch.launch_hook(hook, sm_count=sm_count):
        yield quik, w4
