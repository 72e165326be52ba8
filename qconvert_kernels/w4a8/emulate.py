"""Lane-exact CPU emulator of the repacked W4A8 kernels (w4a8_repacked.cu).

Without a GPU, this is how the kernels are proven.  Every kernel of w4a8_repacked.cu has a twin
here that runs the same program on numpy arrays: each of the 256 threads of a CTA has its own
registers (arrays indexed [thread, ...]); global memory is the tensors the launcher passed, reached
only through their pointers; shared memory is a byte array that remembers, for every byte, which
thread wrote it, in which barrier interval, for which pipeline stage, and whether an asynchronous
copy is still in flight into it.  The index math is written once here and once in the .cu, with
the same function names (each .cu helper carries an ``[emulate.<name>]`` tag).

What it checks on every launch (EmulationError otherwise):
  * every global load and store: inside the tensor the pointer came from, aligned to its width
    (16 bytes for the 16-byte loads and cp.async copies); null pointers are never dereferenced;
  * every shared read: the bytes were written (no stale data), belong to the stage / chunk the
    kernel means to read (a tag per write), no asynchronous copy is still landing on them, and
    a byte written by another thread was written before the last __syncthreads (RAW); every
    shared write or cp.async: no other thread read the bytes since the last __syncthreads (WAR);
  * cp.async groups complete only at cp.async.wait_group, per the group count;
  * tensor-core products built from the lanes' registers with the PTX ISA fragment tables of
    mma.m16n8k32.row.col.s32.s8.s8.s32 (``mma_m16n8k32``);
  * CTAs run as interleaved coroutines in a random order, at most ``resident`` at a time,
    dispatched in grid order: the amax exchange must not deadlock and the split-K result must not
    depend on the order in which the CTAs finish;
  * every output element is written exactly once, and the workspace is back to zero afterwards.

Use:  ``with emulating(sm_count=8): y = cuda.linear(x_cpu, cuda.prepare(..., device="cpu"))`` runs
the real launcher, whose launches land here.  ``mutations`` switch on deliberate kernel bugs
(tests/test_kernels_w4a8_emulate.py checks that each one is caught).
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qconvert_kernels import launch

# ----------------------------------------------------------------------------- constants
# Twins of the w4r:: / qk:: constants of the .cu (the tests parse the .cu and compare).
THREADS = 256
WARPS = 8
BN = 128
LANE_CHUNK = 16
BLOCK_BYTES = 32 * LANE_CHUNK
D_STAGES = 8
D_STAGE_BYTES = WARPS * BLOCK_BYTES
D_W_BYTES = D_STAGES * D_STAGE_BYTES
D_SCALE_AHEAD = 4   # W4R_SCALE_AHEAD's default: decode's L2 prefetch of the scales, groups ahead of their read
D_XQ_BYTES = 32768
D_AUX_BYTES = 3 * 64 * 4 + 16
WS_AMAX, WS_ARRIVE, WS_DONE, WS_TILES = 0, 64, 65, 128
P_BM, P_STAGES, P_BK = 128, 4, 128
P_W_STAGE = 8 * 2 * BLOCK_BYTES
P_X_STAGE = P_BM * P_BK
P_SMEM = P_STAGES * (P_W_STAGE + P_X_STAGE)
PREFILL_BMS = (128, 64)   # the prefill kernels' token tiles (w4a8r_prefill_*: 128, w4a8r_prefill_*_bm64: 64)


def p_smem(bm: int) -> int:
    """Dynamic shared memory of the prefill kernel with BM-token tiles.          [w4r::p_smem]"""
    return P_STAGES * (P_W_STAGE + bm * P_BK)
QUANT_THREADS = 256
TAG_X = 1 << 40  # shared-memory write tags: weight stage / block i -> i, activation stage / chunk i -> TAG_X + i

DECODE_PARAMS = ("x", "wq", "scales", "cscale", "alpha_log2", "y", "acc_out", "part", "ws", "M", "N", "K", "N128",
                 "G", "spg", "KB", "S", "gq", "gr", "A", "ak_log2", "flags")
PREFILL_PARAMS = ("xq", "t", "wq", "scales", "cscale", "alpha_log2", "y", "acc_out", "part", "counters", "M", "N",
                  "N128", "G", "spg", "KB", "S", "gq", "gr", "mtiles", "ntiles", "band_log2", "flags")
QUANT_PARAMS = ("x", "xq", "t", "M", "K", "Kq")
QUIK_PREFILL_PARAMS = PREFILL_PARAMS + ("zq", "zc", "y_add")   # w4a8r_prefill_quik: QUIK's epilogue
QUIK_DECODE_PARAMS = DECODE_PARAMS + ("xq", "t", "zq", "zc", "y_add")   # w4a8r_decode_quik_m*
WIDEN_PARAMS = ("wq", "ew", "step_group", "w8", "N16", "N128", "KB")   # w4a8r_widen_zq (fp8/fp8_repacked.cu)
ZQ_DECODE_PARAMS = DECODE_PARAMS + ("lorc_h", "lorc_u", "lorc_r")    # w4a8r_decode_zq_m* (fp8/fp8_repacked.cu)
LORC_H_PARAMS = ("x", "v", "h", "M", "K", "R", "flags")              # w4a8r_lorc_h_zq
LORC_MAX_R = 32

MUTATIONS = frozenset({
    "swap_halves",      # a_frag: k 8tig+4..7 fed as mma k 4tig.. and vice versa for the weights only
    "no_sign",          # the weight bytes taken as unsigned (the sign of q dropped)
    "c_map",            # epilogue reads c1 / c2 swapped (a wrong accumulator map)
    "stage_off_by_one", # the pipelines read the slot of the next stage
    "no_wait",          # cp.async.wait_group skipped
    "no_barrier",       # the barrier after quantizing an x chunk skipped
    "swizzle_off",      # prefill: activations read without the XOR swizzle
    "amax_local",       # decode: each CTA quantizes with the amax of its own chunk only
    "ticket_order",     # split-K: partials summed in arrival order instead of split order
    "ftz",              # float ops flush subnormal inputs and results to zero (what -ftz=true does)
    "k_perm",           # decode: activations fed in natural k order while the weights use the 8tig permutation
    "late_publishers",  # decode: the amax is published by the LAST A CTAs of the grid (deadlock-prone)
    "no_stage_barrier", # prefill: the __syncthreads after cp.async.wait_group skipped
    "own_amax_half",    # decode, A = 0: each CTA's own amax reads only the first half of every row
    "fallback_stage0",  # prefill: a zero-filled copy names stage 0's address (past the buffers when Kq = 64)
    "g128_carry",       # prefill g = 128: a group's first k step adds to the previous group's P
    "bias_off",         # prefill g = 128, FS: the accumulator's bias start one off
    "quik_order",       # QUIK's epilogue: the outlier product added before the zero-point term
    "quik_no_z",        # QUIK's epilogue: the zero-point term z[m] * ws[n] * R[n] left out
    "zq_gather",        # ZQ: the E2M1 widening gathers k+4..k+7 into the low register and k..k+3 into the high one
    "zq_sign",          # ZQ: k..k+3 take the sign bits of k+4..k+7 (bit 7 of each byte, not bit 3 shifted)
    "zq_qmax",          # ZQ decode: the activations scaled to 127 (the int8 range) instead of E4M3's 448
    "widen_row",        # ZQ widening: the word of row gid + 8 stored at row gid (j & 1 ignored)
    "widen_group",      # ZQ widening: the exponent of the k step's group + 1 (the step-to-group table read one on)
    "lorc_u_row",       # ZQ decode with LoRC: the epilogue reads U's row n ^ 1 instead of n
    "prefetch_next",    # decode: the scale prefetch names the group after the one it is for
    "lorc_lanes",       # LoRC's h: the 32 lanes of a warp summed in lane order instead of the xor butterfly
})


class EmulationError(AssertionError):
    """A kernel broke a rule the emulator checks (bounds, alignment, stale or racy shared memory,
    deadlock, double write ...)."""


# ----------------------------------------------------------------------------- index math twins


def w_chunk(t16, kb, lane, KB):
    """Repacked weight chunk (16-byte units) of (n16 tile, k64 block, lane).     [w4r::w_chunk]"""
    return (np.asarray(t16, np.int64) * KB + kb) * 32 + lane


def d_w_slot(st, warp, lane):
    """Decode: a lane's shared slot of weight stage st (bytes).                  [w4r::d_w_slot]"""
    return ((np.asarray(st, np.int64) * WARPS + warp) * 32 + lane) * LANE_CHUNK


def split_groups(s: int, gq: int, gr: int) -> tuple[int, int]:
    """Groups [g0, g1) of split s.                                   [w4r::split_g0 / split_g1]"""
    g0 = s * gq + min(s, gr)
    return g0, g0 + gq + (1 if s < gr else 0)


def ceil_log2(v: int) -> int:
    return 0 if v <= 1 else (v - 1).bit_length()


def p_x_off(row, c, swizzle=True):
    """Prefill: byte offset of (row, 16-byte chunk c) of an x stage, XOR-swizzled. [w4r::p_x_off]"""
    row = np.asarray(row, np.int64)
    return row * P_BK + (((np.asarray(c, np.int64) ^ ((row & 3) << 1)) if swizzle else np.asarray(c, np.int64)) << 4)


def p_copy_plan(tid, t16_0, m0, M, KB, Kq, bm: int = P_BM):
    """Prefill: a thread's stage-0 copy sources and destinations, worked out once (a stage adds 64
    weight chunks and 128 activation bytes; copy r of the weights is 4 n16 tiles on, of the
    activations 32 rows on, rows past M read as row M - 1).  Returns (weight chunk, its r step, block
    bit, the bm / 32 x byte offsets, x destination, x row, x chunk).       [w4r::prefill p_copy_plan]"""
    tid = np.asarray(tid, np.int64)
    lane, w_bit = tid & 31, (tid >> 5) & 1
    x_row, x_c = tid >> 3, tid & 7
    x_src = [np.minimum(m0 + x_row + 32 * r, M - 1) * Kq + x_c * 16 for r in range(bm // 32)]   # rows past M: row M - 1
    return (w_chunk(t16_0 + (tid >> 6), w_bit, lane, KB), 4 * KB * 32, w_bit, x_src, p_x_off(x_row, x_c), x_row, x_c)


def p_frag_offsets(wn, wm, lane, swizzle=True, bm: int = P_BM):
    """Prefill: a lane's fragment offsets in a stage: weights (tile a, block b2) at w_off + 512 (2 a +
    b2); activations of k step ks, n8 tile j at x_off[ks] + 1024 j (warp row wm * bm / 2 + gid).
                                                                           [w4r::prefill p_frag_offsets]"""
    gid, tig = lane >> 2, lane & 3
    w_off = ((4 * np.asarray(wn, np.int64)) * 32 + lane) * 16
    x_off = [p_x_off(wm * (bm // 2) + gid, 2 * ks + (tig >> 1), swizzle) + ((tig & 1) << 3) for ks in range(4)]
    return w_off, x_off


def part_slot(s, tiles, tile, warp, f, nfrag, lane):
    """Split-K partial slot (int4 units).                                         [w4r::part_slot]"""
    return ((np.int64(s) * tiles + tile) * WARPS + np.asarray(warp, np.int64)) * nfrag * 32 + f * 32 + np.asarray(lane, np.int64)


def decode_smem(mt8: int, stages: int = D_STAGES) -> int:
    rows = 8 * mt8
    return stages * D_STAGE_BYTES + rows * (D_XQ_BYTES // rows + 32) + D_AUX_BYTES


# ----------------------------------------------------------------------------- float helpers

_F32_TINY = np.float32(2.0**-126)


class FloatOps:
    """float32 arithmetic as the kernels write it (each op rounded once, no FMA); with ``ftz`` the
    inputs and results of every op are flushed to zero when subnormal (what -ftz=true does)."""

    def __init__(self, ftz: bool):
        self.ftz = ftz

    def f(self, v):
        v = np.asarray(v, np.float32)
        if self.ftz:
            v = np.where(np.abs(v) < _F32_TINY, np.float32(0), v).astype(np.float32)
        return v

    def mul(self, a, b):
        with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN behave as on the GPU
            return self.f(self.f(a) * self.f(b))

    def add(self, a, b):
        return self.f(self.f(a) + self.f(b))

    def rcp(self, a):   # qk::rcp_rn: double reciprocal rounded once to float
        with np.errstate(divide="ignore"):
            return self.f((1.0 / self.f(a).astype(np.float64)).astype(np.float32))

    def div(self, a, b):  # qk::div_rn
        return self.f((self.f(a).astype(np.float64) / np.float64(b)).astype(np.float32))

    def i2f(self, v):
        return self.f(np.asarray(v, np.int64).astype(np.float32))


def f16_bits_to_f32(bits):
    return np.asarray(bits, np.uint16).view(np.float16).astype(np.float32)


def bf16_bits_to_f32(bits):
    return (np.asarray(bits, np.uint32) << 16).astype(np.uint32).view(np.float32)


def f32_to_bits16(v, bf16: bool):
    v = np.asarray(v, np.float32)
    if bf16:
        return torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return v.astype(np.float16).view(np.uint16)


def wrap32(v):
    return (np.asarray(v, np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


# ----------------------------------------------------------------------------- tensor cores

# PTX ISA, "Matrix Fragments for mma.m16n8k32" (.s8): lane = 4 gid + tig, register r, byte i
_LANE = np.arange(32)
_GID, _TIG = _LANE >> 2, _LANE & 3
# A: 4 registers x 4 bytes: row gid + 8 (r & 1), col 4 tig + i + 16 (r >> 1)
_A_ROW = (_GID[:, None, None] + 8 * (np.arange(4)[None, :, None] & 1)) + 0 * np.arange(4)[None, None, :]
_A_COL = 4 * _TIG[:, None, None] + np.arange(4)[None, None, :] + 16 * (np.arange(4)[None, :, None] >> 1)
# B: 2 registers x 4 bytes: row (k) 4 tig + i + 16 r, col gid
_B_ROW = 4 * _TIG[:, None, None] + np.arange(4)[None, None, :] + 16 * np.arange(2)[None, :, None]
_B_COL = _GID[:, None, None] + 0 * _B_ROW
# C: 4 registers: row gid + 8 (r >> 1), col 2 tig + (r & 1)
_C_ROW = _GID[:, None] + 8 * (np.arange(4)[None, :] >> 1)
_C_COL = 2 * _TIG[:, None] + (np.arange(4)[None, :] & 1)


def _bytes_of(regs, signed: bool):
    """uint32 registers [..., R] -> bytes [..., R, 4] (byte 0 = lowest), as int8 or uint8."""
    b = np.asarray(regs, np.uint32)[..., None] >> (8 * np.arange(4, dtype=np.uint32))
    b = (b & 0xFF).astype(np.uint8)
    return b.view(np.int8).astype(np.int64) if signed else b.astype(np.int64)


def byte_perm(x, y, sel):
    """__byte_perm(x, y, sel) (PRMT, default mode): result byte i is byte (sel >> 4 i) & 7 of the 8
    bytes {y, x}, or that byte's sign replicated when bit 3 of the selector nibble is set; ``sel``
    a constant or one selector per element."""
    src = np.asarray(x, np.uint64) | (np.asarray(y, np.uint64) << np.uint64(32))
    sel = np.broadcast_to(np.asarray(sel, np.uint64), src.shape)
    out = np.zeros(src.shape, np.uint64)
    for i in range(4):
        nib = (sel >> np.uint64(4 * i)) & np.uint64(0xF)
        b = (src >> (np.uint64(8) * (nib & np.uint64(7)))) & np.uint64(0xFF)
        b = np.where(nib & np.uint64(8), np.where(b & np.uint64(0x80), np.uint64(0xFF), np.uint64(0)), b)
        out |= b << np.uint64(8 * i)
    return out.astype(np.uint32)


_E4M3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double().numpy()
E4M3_MAX = np.float32(448.0)


def e4m3_values(regs):
    """uint32 registers [..., R] -> their 4 E4M3 bytes as float64 [..., R, 4] (byte 0 = lowest)."""
    b = (np.asarray(regs, np.uint32)[..., None] >> (8 * np.arange(4, dtype=np.uint32))) & 0xFF
    return _E4M3[b]


def to_e4m3_bits(v):
    """cvt.rn.satfinite.e4m3x2.f32 of float32 values (round to nearest even, saturating)."""
    v = np.clip(np.asarray(v, np.float32), -E4M3_MAX, E4M3_MAX)
    return torch.from_numpy(np.ascontiguousarray(v)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def mma_matrices_m16n8k32(a_vals, b_vals):
    """A [batch, 16, 32] and B [batch, 32, 8] of an m16n8k32 mma on 8-bit types (.s8, .u8, .e4m3
    share one layout) from the lanes' byte values, a_vals [batch, 32, 4 registers, 4 bytes] and
    b_vals [batch, 32, 2, 4], placed by the PTX fragment tables."""
    a_vals, b_vals = np.asarray(a_vals), np.asarray(b_vals)
    A = np.zeros((a_vals.shape[0], 16, 32), a_vals.dtype)
    B = np.zeros((b_vals.shape[0], 32, 8), b_vals.dtype)
    A[:, _A_ROW, _A_COL] = a_vals
    B[:, _B_ROW, _B_COL] = b_vals
    return A, B


def mma_c_lanes(D):
    """D [batch, 16, 8] -> each lane's 4 C / D registers [batch, 32, 4] (PTX fragment table)."""
    return np.asarray(D)[:, _C_ROW, _C_COL]


def mma_m16n8k32(a, b, c, zero_c: bool = False, a_unsigned: bool = False):
    """D = A B + C of mma.m16n8k32.row.col.s32.s8.s8.s32 for a batch of warps.

    a uint32 [batch, 32 lanes, 4], b uint32 [batch, 32, 2], c int32 [batch, 32, 4] -> int32 [batch, 32, 4]:
    the matrices are assembled from the lanes with the PTX fragment tables, multiplied exactly,
    and scattered back; int32 wraps like the hardware."""
    A, B = mma_matrices_m16n8k32(_bytes_of(a, signed=not a_unsigned), _bytes_of(b, signed=True))
    out = mma_c_lanes(A @ B)
    if not zero_c:
        out = out + np.asarray(c, np.int64)
    return wrap32(out)


# ----------------------------------------------------------------------------- memory


class Global:
    """The launch's global memory: the tensors the launcher passed, reached by their addresses.
    Every access is checked for bounds and alignment; stores to ``track``ed tensors are counted."""

    def __init__(self):
        self.views: dict[int, np.ndarray] = {}
        self.writes: dict[int, np.ndarray] = {}
        self.strided: set[int] = set()  # arguments a kernel reads with a row stride (``allow_rows``)

    def allow_rows(self, address: int) -> None:
        """This argument's kernel takes a row stride: a column slice (dense rows a stride apart) is
        what it may read, not an error (every other argument must be contiguous)."""
        self.strided.add(int(address))

    def view(self, address: int) -> np.ndarray:
        address = int(address)
        if address == 0:
            raise EmulationError("dereferenced a null pointer")
        if address not in self.views:
            t = launch.tensor_at(address)
            if not t.is_contiguous():
                if address not in self.strided:
                    raise EmulationError("a kernel argument is not contiguous")
                t = self._row_strided(t)
            self.views[address] = t.reshape(-1).view(torch.uint8).numpy()
        return self.views[address]

    @staticmethod
    def _row_strided(t: torch.Tensor) -> torch.Tensor:
        """A 2-D tensor whose rows are dense but lie a stride apart (a column slice, read in place by
        the kernels that take a row stride) as the span of memory from its first element to its last:
        what the kernel may reach.  Anything else is refused."""
        if t.dim() != 2 or t.stride(1) != 1 or t.stride(0) < t.shape[1]:
            raise EmulationError("a kernel argument is not contiguous")
        span = (t.shape[0] - 1) * t.stride(0) + t.shape[1] if t.numel() else 0
        return t.as_strided((span,), (1,), t.storage_offset())

    def track(self, address: int) -> None:
        self.writes[int(address)] = np.zeros(self.view(address).shape[0], np.int32)

    def _check(self, address: int, offs, width: int, what: str):
        buf = self.view(address)
        offs = np.asarray(offs, np.int64).reshape(-1)
        if offs.size == 0:
            return buf, offs
        if ((address + offs) % width).any():
            raise EmulationError(f"{what}: {width}-byte access not {width}-byte aligned (offset {int(offs[((address + offs) % width) != 0][0])})")
        if offs.min() < 0 or offs.max() + width > buf.shape[0]:
            bad = offs[(offs < 0) | (offs + width > buf.shape[0])][0]
            raise EmulationError(f"{what}: {width}-byte access at byte {int(bad)} outside the tensor ({buf.shape[0]} bytes)")
        return buf, offs

    def load(self, address: int, offs, width: int, what: str) -> np.ndarray:
        buf, offs = self._check(address, offs, width, what)
        return buf[offs[:, None] + np.arange(width)]

    def store(self, address: int, offs, data, what: str) -> None:
        data = np.asarray(data, np.uint8)
        width = data.shape[-1]
        buf, offs = self._check(address, offs, width, what)
        idx = (offs[:, None] + np.arange(width)).reshape(-1)
        buf[idx] = data.reshape(-1)
        if int(address) in self.writes:
            np.add.at(self.writes[int(address)], idx, 1)

    def load_u32(self, address, elem_idx, what):
        return self.load(address, np.asarray(elem_idx, np.int64) * 4, 4, what).view(np.uint32)[:, 0]


class Shared:
    """One CTA's shared memory with per-byte provenance (see the module docstring)."""

    def __init__(self, nbytes: int):
        self.data = np.zeros(nbytes, np.uint8)
        self.tag = np.full(nbytes, -1, np.int64)        # stage / chunk tag of the last write (-1: never)
        self.wthr = np.full(nbytes, -1, np.int32)       # writer thread
        self.wep = np.full(nbytes, -1, np.int64)        # barrier interval of the write
        self.inflight = np.zeros(nbytes, bool)          # an async copy is landing here
        self.rthr = np.full(nbytes, -1, np.int32)       # last reader (-2: several)
        self.rep = np.full(nbytes, -1, np.int64)        # barrier interval of the last read
        self.epoch = 0
        self.groups: list[list] = []
        self.open: list = []
        self.conflicts: dict[str, int] = {}             # access site -> worst bank-conflict degree

    def barrier(self):
        self.epoch += 1

    def _idx(self, offs, width, what):
        offs = np.asarray(offs, np.int64)
        if (offs % min(width, 16)).any():
            raise EmulationError(f"{what}: misaligned {width}-byte shared access")
        if offs.min() < 0 or offs.max() + width > self.data.shape[0]:
            raise EmulationError(f"{what}: shared access outside the {self.data.shape[0]} bytes")
        return offs[:, None] + np.arange(width)

    def _bank_check(self, tids, offs, width, what):
        """Worst number of distinct 4-byte words one bank serves in one wavefront of a warp."""
        tids = np.asarray(tids)
        per_phase = 32 if width <= 4 else 128 // width
        worst = 1
        for w in np.unique(tids >> 5):
            sel = (tids >> 5) == w
            lanes, o = tids[sel] & 31, np.asarray(offs)[sel]
            for ph in range(0, 32, per_phase):
                m = (lanes >= ph) & (lanes < ph + per_phase)
                words = np.unique(((o[m][:, None] + np.arange(0, max(width, 4), 4)) // 4).reshape(-1))
                if words.size:
                    worst = max(worst, int(np.bincount(words % 32).max()))
        self.conflicts[what] = max(self.conflicts.get(what, 1), worst)

    def _war(self, tids, idx, what):
        same = self.rep[idx] == self.epoch
        other = (self.rthr[idx] != np.asarray(tids)[:, None]) & (self.rthr[idx] != -1)
        if (same & other).any():
            raise EmulationError(f"{what}: write over bytes another thread read since the last barrier (WAR race)")

    def write(self, tids, offs, data, tag, what):
        data = np.asarray(data, np.uint8)
        idx = self._idx(offs, data.shape[-1], what)
        if self.inflight[idx].any():
            raise EmulationError(f"{what}: write over an async copy still in flight")
        self._war(tids, idx, what)
        self._bank_check(tids, offs, data.shape[-1], what)
        self.data[idx] = data
        self.tag[idx] = tag
        self.wthr[idx] = np.asarray(tids)[:, None]
        self.wep[idx] = self.epoch

    def read(self, tids, offs, width, tag, what) -> np.ndarray:
        idx = self._idx(offs, width, what)
        tids = np.asarray(tids)
        if self.inflight[idx].any():
            raise EmulationError(f"{what}: read of an async copy still in flight (missing cp.async.wait_group)")
        if (self.tag[idx] != tag).any():
            got = self.tag[idx][self.tag[idx] != tag][0]
            raise EmulationError(f"{what}: read bytes of {'nothing' if got == -1 else f'stage {got}'}, wanted stage {tag}")
        other = self.wthr[idx] != tids[:, None]
        if (other & (self.wep[idx] >= self.epoch)).any():
            raise EmulationError(f"{what}: read of another thread's write with no barrier between (RAW race)")
        self._bank_check(tids, offs, width, what)
        r = self.rthr[idx]
        fresh = self.rep[idx] != self.epoch
        self.rthr[idx] = np.where(fresh | (r == -1) | (r == tids[:, None]), tids[:, None], -2)
        flat = idx.reshape(-1)
        order = np.argsort(flat, kind="stable")
        fi, ft = flat[order], np.broadcast_to(tids[:, None], idx.shape).reshape(-1)[order]
        several = (fi[1:] == fi[:-1]) & (ft[1:] != ft[:-1])   # one byte read by two threads in this access
        if several.any():
            self.rthr[fi[1:][several]] = -2
        self.rep[idx] = self.epoch
        return self.data[idx]

    def cp_async(self, tids, offs, src, tag, what):
        src = np.asarray(src, np.uint8)
        idx = self._idx(offs, 16, what)
        if self.inflight[idx].any():
            raise EmulationError(f"{what}: async copy over another one still in flight")
        self._war(tids, idx, what)
        self._bank_check(tids, offs, 16, what)
        self.inflight[idx] = True
        self.open.append((np.asarray(tids), idx, src, tag))

    def commit(self):
        self.groups.append(self.open)
        self.open = []

    def wait(self, n: int):
        while len(self.groups) > n:
            for tids, idx, src, tag in self.groups.pop(0):
                self.inflight[idx] = False
                self.data[idx] = src
                self.tag[idx] = tag
                self.wthr[idx] = tids[:, None]
                self.wep[idx] = self.epoch


# ----------------------------------------------------------------------------- CTA scheduling


def run_grid(programs, resident: int, rng: random.Random):
    """Run CTA coroutines: dispatched in grid order, at most ``resident`` at a time, resumed in a
    random order.  A coroutine yields None (a point where others may run) or a predicate (it spins
    until the predicate holds).  All resident CTAs spinning is a deadlock."""
    pending = list(programs)
    active = []  # [generator, predicate]
    while pending or active:
        while pending and len(active) < resident:
            active.append([pending.pop(0), None])
        ready = [a for a in active if a[1] is None or a[1]()]
        if not ready:
            raise EmulationError(f"deadlock: {len(active)} resident CTAs all spin-waiting ({len(pending)} not dispatched)")
        cur = rng.choice(ready)
        try:
            cur[1] = next(cur[0])
        except StopIteration:
            active.remove(cur)


# ----------------------------------------------------------------------------- shared pieces


@dataclass
class Ctx:
    mem: Global
    args: dict
    mutations: frozenset
    fops: FloatOps
    conflicts: dict = field(default_factory=dict)
    ticket_log: dict = field(default_factory=dict)
    amax_paths: dict = field(default_factory=dict)   # decode: "own" / "exchange" -> CTAs that took it
    scale_log: list = field(default_factory=list)    # decode: (cta, "load" / "prefetch", group, iteration; -1: before the loop)
    scale_ahead: int = D_SCALE_AHEAD                 # W4R_SCALE_AHEAD as the launched source defines it
    d_stages: int = D_STAGES                         # W4R_D_STAGES as the launched source defines it


def load_x8(ctx: Ctx, m, k, K, vec, bf16, active, what="x"):
    """8 activations x[m, k..k+7] per thread as float32 [n, 8] (zeros past K).     [w4r::load_x8]"""
    m, k = np.asarray(m, np.int64), np.asarray(k, np.int64)
    out = np.zeros((m.shape[0], 8), np.float32)
    conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
    x = ctx.args["x"]
    if vec:
        sel = active & (k < K)
        if sel.any():
            raw = ctx.mem.load(x, (m[sel] * K + k[sel]) * 2, 16, f"{what}: 16-byte activation load")
            out[sel] = conv(raw.view(np.uint16))
    else:
        for e in range(8):
            sel = active & (k + e < K)
            if sel.any():
                raw = ctx.mem.load(x, (m[sel] * K + k[sel] + e) * 2, 2, f"{what}: activation load")
                out[sel, e] = conv(raw.view(np.uint16)[:, 0])
    return ctx.fops.f(out)


def a_frag(ctx: Ctx, w_lo_row, w_hi_row):
    """Repacked words (rows gid, gid + 8) -> A registers [n, 4] (bytes 16 q).         [w4r::a_frag]"""
    lo16 = lambda w: (np.asarray(w, np.uint32) << np.uint32(4)) & np.uint32(0xF0F0F0F0)  # noqa: E731
    hi16 = lambda w: np.asarray(w, np.uint32) & np.uint32(0xF0F0F0F0)  # noqa: E731
    a = np.stack([lo16(w_lo_row), lo16(w_hi_row), hi16(w_lo_row), hi16(w_hi_row)], axis=-1)
    if "swap_halves" in ctx.mutations:
        a = a[..., [2, 3, 0, 1]]
    return a


FP4_T_LO, FP4_T_HI = 0x3C383000, 0x4C484440   # w4r::fp4x8r_to_e4m3's table: E2M1 magnitudes 0..7 as E4M3


def fp4x8r_to_e4m3(ctx: Ctx, w):
    """A repacked word's 8 E2M1 codes (position 2i = k + i, 2i + 1 = k + 4 + i) -> (lo, hi): the E4M3
    bytes of k..k+3 and k+4..k+7, by the kernel's PRMT table and gathers.          [w4r::fp4x8r_to_e4m3]"""
    w = np.asarray(w, np.uint32)
    t_lo, t_hi = np.full_like(w, FP4_T_LO), np.full_like(w, FP4_T_HI)
    lw = byte_perm(t_lo, t_hi, w & np.uint32(0x7777))
    hw = byte_perm(t_lo, t_hi, (w >> np.uint32(16)) & np.uint32(0x7777))
    sel_lo, sel_hi = (0x7531, 0x6420) if "zq_gather" in ctx.mutations else (0x6420, 0x7531)
    sign = np.uint32(0x80808080)
    sign_lo = (w & sign) if "zq_sign" in ctx.mutations else ((w << np.uint32(4)) & sign)
    return byte_perm(lw, hw, sel_lo) | sign_lo, byte_perm(lw, hw, sel_hi) | (w & sign)


def a_frag_fp4(ctx: Ctx, w_lo_row, w_hi_row):
    """ZQ: repacked words (rows gid, gid + 8) -> A registers [n, 4] of E4M3 bytes.     [w4r::a_frag_fp4]"""
    a0, a2 = fp4x8r_to_e4m3(ctx, w_lo_row)
    a1, a3 = fp4x8r_to_e4m3(ctx, w_hi_row)
    a = np.stack([a0, a1, a2, a3], axis=-1)
    if "swap_halves" in ctx.mutations:
        a = a[..., [2, 3, 0, 1]]
    return a


def mma_e4m3(a, b, c, zero_c: bool = False):
    """D = A B + C of mma.m16n8k32.row.col.f32.e4m3.e4m3.f32 for a batch of warps, with the
    accumulator kept exact (float64; the tensor cores' internal rounding is unspecified, see
    fp8/emulate.py): a uint32 [batch, 32, 4], b [batch, 32, 2], c float64 [batch, 32, 4]."""
    A, B = mma_matrices_m16n8k32(e4m3_values(a), e4m3_values(b))
    out = mma_c_lanes(A @ B)
    return out if zero_c else out + np.asarray(c, np.float64)


def load_scale_zq(ctx: Ctx, idx, what="scale"):
    """ZQ group scales at flat [G, N128] indices: 2^e from the int8 exponents, float32.  [w4r::Scale<KIND_ZQ>]"""
    e = ctx.mem.load(ctx.args["scales"], np.asarray(idx, np.int64), 1, what).view(np.int8)[:, 0].astype(np.int32)
    return np.ldexp(np.float32(1), e).astype(np.float32)


def scale_shift(zq: bool, is_int: bool, sc16: bool) -> int:
    """log2 bytes of one group-scale entry: ZQ int8, IS int32 (int16 if sc16), FS fp16.  [w4r::Scale::shift]"""
    return 0 if zq else (2 if is_int and not sc16 else 1)


def load_scale(ctx: Ctx, is_int: bool, idx, sc16: bool, what="scale"):
    """Group scales at flat [G, N128] indices: IS int32 (int16 if sc16); FS float(s) / 16.  [w4r::Scale]"""
    idx = np.asarray(idx, np.int64)
    sc = ctx.args["scales"]
    if is_int:
        if sc16:
            return ctx.mem.load(sc, idx * 2, 2, what).view(np.int16)[:, 0].astype(np.int32)
        return ctx.mem.load(sc, idx * 4, 4, what).view(np.int32)[:, 0]
    return ctx.fops.mul(f16_bits_to_f32(ctx.mem.load(sc, idx * 2, 2, what).view(np.uint16)[:, 0]), np.float32(0.0625))


def p_scales(ctx: Ctx, is_int: bool, idx0, sc16: bool):
    """Prefill: a lane's four scales of one group, flat entries idx0 + 0, 8, 16, 24 (channels n_row
    + 8 e) -> [tile a] [n, row h] with e = 2 a + h.                              [w4r::Scale::load4]"""
    idx0 = np.asarray(idx0, np.int64)
    return [np.stack([load_scale(ctx, is_int, idx0 + 8 * (2 * a + h), sc16) for h in range(2)], -1) for a in range(2)]


def fold(ctx: Ctx, is_int: bool, acc, p16, s):
    """IS: A += s * (16P >> 4) wrapping; FS: acc = acc + float(16P) * (s / 16).          [w4r::fold1]"""
    if is_int:
        return wrap32(acc.astype(np.int64) + s.astype(np.int64) * (p16.astype(np.int64) >> 4))
    return ctx.fops.add(acc, ctx.fops.mul(ctx.fops.i2f(p16), s))


G128_FS_INIT = 0x4B400000   # the bits of the float 2^23 + 2^22: FS's g = 128 accumulator start  [w4r::G128]


def g128_init(ctx: Ctx, is_int: bool) -> int:
    """The constant a g = 128 group's first mma starts P from (IS 0, FS the float bias's bits)."""
    if is_int:
        return 0
    return G128_FS_INIT + (1 if "bias_off" in ctx.mutations else 0)


def biased_to_float(ctx: Ctx, bits):
    """float(16P) from P accumulated on the bias: the bits as a float, minus 2^23 + 2^22 (one FADD).
    Exact while |16P| <= 2^22; the emulator refuses a sum beyond.                  [w4r::biased_to_float]"""
    bits = np.asarray(bits, np.int64)
    if np.abs(bits - G128_FS_INIT).max(initial=0) > 1 << 22:
        raise EmulationError(f"biased_to_float: |16P| = {int(np.abs(bits - G128_FS_INIT).max())} > 2^22, outside the bias's exact range")
    return ctx.fops.add((bits & 0xFFFFFFFF).astype(np.uint32).view(np.float32), np.float32(-12582912.0))


def fold_g128(ctx: Ctx, is_int: bool, acc, p, s):
    """The g = 128 fold: IS as fold (P from zero); FS acc + biased_to_float(P) * (s / 16).  [w4r::fold_g128]"""
    if is_int:
        return fold(ctx, is_int, acc, p, s)
    return ctx.fops.add(acc, ctx.fops.mul(biased_to_float(ctx, p), s))


def out_value(ctx: Ctx, is_int: bool, acc, tm, cs):
    """y before rounding: IS float(A) * (t * cs); FS acc * t.                     [w4r::out_value]"""
    if is_int:
        return ctx.fops.mul(ctx.fops.i2f(acc), ctx.fops.mul(tm, cs))
    return ctx.fops.mul(acc, tm)


def quik_tail(ctx: Ctx, v, m, n, M: int, N: int, zcn, bf16: bool):
    """QUIK's epilogue after out_value, per thread: (v + z[m] * zc[n]) + y_add[m, n] (where there is
    an outlier product), one rounding each; z and y_add not read for outputs past M or N, which are
    not stored.                                                                     [w4r::quik_tail]"""
    a, f, mem = ctx.args, ctx.fops, ctx.mem
    sel = m < M
    zm = np.zeros(THREADS, np.float32)
    if sel.any() and "quik_no_z" not in ctx.mutations:
        zm[sel] = mem.load(a["zq"], m[sel] * 4, 4, "zq").view(np.float32)[:, 0]
    if not a["y_add"]:
        return f.add(v, f.mul(zm, zcn))
    add = np.zeros(THREADS, np.float32)
    ok = sel & (n < N)
    if ok.any():
        conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
        add[ok] = conv(mem.load(a["y_add"], (m[ok] * N + n[ok]) * 2, 2, "y_add").view(np.uint16)[:, 0])
    if "quik_order" in ctx.mutations:
        return f.add(f.add(v, add), f.mul(zm, zcn))
    return f.add(f.add(v, f.mul(zm, zcn)), add)


def quik_zc(ctx: Ctx, n0, gid):
    """zc of each thread's two channels n0 + gid and n0 + gid + 8: float32 [threads, 2]."""
    return np.stack([ctx.mem.load(ctx.args["zc"], (n0 + gid + d) * 4, 4, "zc").view(np.float32)[:, 0] for d in (0, 8)], -1)


def store_pair(ctx: Ctx, m, n, N, v0, v1, what="y"):
    """qk::store_pair for the threads given: one 32-bit store if n + 1 < N and N even, else 16-bit
    stores of the columns < N."""
    y = ctx.args["y"]
    m, n = np.asarray(m, np.int64), np.asarray(n, np.int64)
    v0, v1 = np.asarray(v0, np.uint16), np.asarray(v1, np.uint16)
    pair = (n + 1 < N) & (N % 2 == 0)
    if pair.any():
        data = np.stack([v0[pair], v1[pair]], -1).view(np.uint8).reshape(-1, 4)
        ctx.mem.store(y, (m[pair] * N + n[pair]) * 2, data, f"{what}: 32-bit pair store")
    for v, dn in ((v0, 0), (v1, 1)):
        sel = ~pair & (n + dn < N)
        if sel.any():
            ctx.mem.store(y, (m[sel] * N + n[sel] + dn) * 2, v[sel].view(np.uint8).reshape(-1, 2), f"{what}: 16-bit store")


def store_frag(ctx: Ctx, o, m_base, n0, M, N, tid):
    """The 4 outputs of a C fragment per thread (o uint16 [256, 4]) -> y through the lane^4 shuffle
    (w4r::store_frag).  ``m_base`` and ``n0`` per thread."""
    lane = tid & 31
    gid, tig = lane >> 2, lane & 3
    odd = (gid & 1) == 1
    o = np.asarray(o, np.uint32)
    send = np.where(odd, o[:, 0] | (o[:, 2] << 16), o[:, 1] | (o[:, 3] << 16)).astype(np.uint32)
    recv = send[tid ^ 4]  # __shfl_xor_sync(.., 4) within the warp: lane ^ 4 of the same warp
    r0, r1 = recv & 0xFFFF, recv >> 16
    m = np.asarray(m_base) + 2 * tig + odd
    n = np.asarray(n0) + gid - odd
    sel = m < M
    store_pair(ctx, m[sel], n[sel], N, np.where(odd, r0, o[:, 0])[sel], np.where(odd, o[:, 1], r0)[sel])
    store_pair(ctx, m[sel], n[sel] + 8, N, np.where(odd, r1, o[:, 2])[sel], np.where(odd, o[:, 3], r1)[sel])


def c_regs(ctx: Ctx, acc):
    """The epilogue's view of the 4 accumulator registers (the c_map mutation swaps c1 / c2)."""
    return acc[..., [0, 2, 1, 3]] if "c_map" in ctx.mutations else acc


def splitk_reduce(ctx: Ctx, acc, is_int, s, S, tiles, tile, ticket_ptr, ticket_idx, tid, key):
    """Coroutine of w4r::splitk_reduce: publish, ticket, and (last CTA) the fixed-order sum.
    acc [256, NF, 4] (int32 or float32).  Yields; returns the reduced acc or None."""
    warp, lane = tid >> 5, tid & 31
    nf = acc.shape[1]
    part = ctx.args["part"]
    bits = acc.view(np.int32) if not is_int else acc
    for f in range(nf):
        ctx.mem.store(part, part_slot(s, tiles, tile, warp, f, nf, lane) * 16, bits[:, f, :].astype(np.int32).view(np.uint8).reshape(-1, 16),
                      "split-K partial store")
    yield None  # __threadfence; __syncthreads: other CTAs may run here
    ws = ctx.mem.view(ticket_ptr).view(np.int32)
    t = int(ws[ticket_idx])
    ws[ticket_idx] = t + 1
    order = ctx.ticket_log.setdefault(key, [])
    order.append(s)
    if t != S - 1:
        return None
    ws[ticket_idx] = 0
    seq = order if "ticket_order" in ctx.mutations else list(range(S))
    total = None
    for s2 in seq:
        if s2 == s:
            v = acc
        else:
            raw = np.stack([ctx.mem.load(part, part_slot(s2, tiles, tile, warp, f, nf, lane) * 16, 16, "split-K partial load")
                            .view(np.int32) for f in range(nf)], axis=1)
            v = raw if is_int else raw.view(np.float32)
        if total is None:
            total = v.copy()
        else:
            total = wrap32(total.astype(np.int64) + v.astype(np.int64)) if is_int else ctx.fops.add(total, v)
    return total


# ----------------------------------------------------------------------------- decode


def token_scales(ctx: Ctx, amax, rows: int, qmax: float = 127.0):
    """Per-token (inv, t) [rows] from the amax of the first len(amax) tokens (zeros past them):
    inv = rn(rn(1 / amax) * Q), 0 for an all-zero token; t = rn(amax / Q); Q = 127, or 448 for ZQ.
                                                                                 [w4r::token_scales]"""
    fops = ctx.fops
    m = len(amax)
    s_inv, s_t = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    s_inv[:m] = np.where(amax > 0, fops.mul(fops.rcp(amax), np.float32(qmax)), np.float32(0))
    s_t[:m] = fops.div(amax, qmax)
    return s_inv, s_t


def own_amax(ctx: Ctx, M: int, K: int, ak_log2: int, vec: bool, bf16: bool):
    """A = 0: the per-token amax of M rows over all of K, read whole by one CTA (8-element units of
    2^ak_log2 >= K per row, zeros past K), as float32 [M].                      [w4r::decode own_amax]
    The ``own_amax_half`` mutation reads only the first half of each row."""
    upr = ak_log2 - 3
    if (1 << ak_log2) < K:
        raise EmulationError(f"own amax: 2^{ak_log2} < K = {K}: the rows are not read whole")
    units = M << upr
    u = np.arange(units)
    m, k = u >> upr, (u & ((1 << upr) - 1)) << 3
    if "own_amax_half" in ctx.mutations:
        keep = k < (1 << ak_log2) // 2
        m, k = m[keep], k[keep]
    v = load_x8(ctx, m, k, K, vec, bf16, np.ones(m.shape[0], bool), "own amax x")
    amax = np.zeros(M, np.float32)
    np.fmax.at(amax, m, np.fmax.reduce(np.abs(v), axis=1))   # fmaxf: a NaN loses to a number
    return amax


def decode_cta(ctx: Ctx, mt8: int, is_int: bool, grid, s: int, tile: int, quik: bool = False, zq: bool = False):
    """Coroutine of one decode CTA (w4r::decode; ``quik``: w4r::decode<MT8, KIND_IS, true>, the
    activations quantized by quik_split and QUIK's epilogue; ``zq``: KIND_ZQ, E4M3 activations,
    E2M1 weights on FP8 tensor cores, acc += P * 2^e), threads vectorized."""
    a = ctx.args
    mut, fops, mem = ctx.mutations, ctx.fops, ctx.mem
    qmax = 448.0 if zq and "zq_qmax" not in ctx.mutations else 127.0
    ROWS = 8 * mt8
    XK = D_XQ_BYTES // ROWS
    XS = XK + 32
    stages = ctx.d_stages
    W_BYTES = stages * D_STAGE_BYTES   # the weight stages; the x chunk after them
    sm = Shared(decode_smem(mt8, stages))
    tid = np.arange(THREADS)
    warp, lane = tid >> 5, tid & 31
    gid, tig = lane >> 2, lane & 3
    S, tiles = grid[0], grid[1]
    cta = tile * S + s
    M, N, K, N128, KB = a["M"], a["N"], a["K"], a["N128"], a["KB"]
    spg, A, ak_log2, flags = a["spg"], a["A"], a["ak_log2"], a["flags"]
    bf16, vec, sc16 = bool(flags & 1), bool(flags & 2), bool(flags & 4)
    ws = mem.view(a["ws"]).view(np.int32)

    g0, g1 = split_groups(s, a["gq"], a["gr"])
    kk0, kk1 = g0 * spg, g1 * spg
    kb0 = kk0 >> 1
    nblk = ((kk1 + 1) >> 1) - kb0
    t16 = tile * WARPS + warp

    def issue(blk):
        src = mem.load(a["wq"], w_chunk(t16, kb0 + blk, lane, KB) * 16, 16, "weight cp.async")
        sm.cp_async(tid, d_w_slot(blk % stages, warp, lane), src, blk, "decode weight cp.async")

    # 1. weight prologue
    for i in range(stages - 1):
        if i < nblk:
            issue(i)
        sm.commit()

    # 1b. group g0's scales, then the next AHEAD groups' lines into L2 (each lane its own entry's line)
    n_row = t16 * 16 + gid
    ahead = decode_ahead(ctx, zq, mt8)

    def scales(g, it):
        ctx.scale_log.append((cta, "load", g, it))
        if zq:
            return np.stack([load_scale_zq(ctx, g * N128 + n_row), load_scale_zq(ctx, g * N128 + n_row + 8)], -1)
        return np.stack([load_scale(ctx, is_int, g * N128 + n_row, sc16), load_scale(ctx, is_int, g * N128 + n_row + 8, sc16)], -1)

    def prefetch(h, it):
        """prefetch.global.L2 of the line of each lane's entry of group h: nothing is read, the entry's
        address must lie in the scales.                                        [w4r::prefetch_scale]"""
        g = h + 1 if "prefetch_next" in mut else h
        width = 1 << scale_shift(zq, is_int, sc16)
        mem._check(a["scales"], (g * N128 + n_row) * width, width, "scale prefetch")
        ctx.scale_log.append((cta, "prefetch", g, it))

    sc = scales(g0, -1)
    for h in range(g0 + 1, min(g0 + ahead, g1 - 1) + 1) if ahead else ():
        prefetch(h, -1)

    # 2. amax: A = 0, each CTA over its rows whole (own_amax); else the exchange  [w4r::decode]
    if quik:  # quantized by quik_split: its per-token scale only
        s_inv, s_t = np.zeros(ROWS, np.float32), np.zeros(ROWS, np.float32)
        s_t[:M] = mem.load(a["t"], np.arange(M) * 4, 4, "t").view(np.float32)[:, 0]
        yield None
    elif A == 0:
        ctx.amax_paths["own"] = ctx.amax_paths.get("own", 0) + 1
        s_inv, s_t = token_scales(ctx, own_amax(ctx, M, K, ak_log2, vec, bf16), ROWS, qmax)
        yield None
    else:
        ctx.amax_paths["exchange"] = ctx.amax_paths.get("exchange", 0) + 1
        publisher = (cta >= grid[0] * grid[1] - A) if "late_publishers" in mut else (cta < A)
        chunk_id = cta - (grid[0] * grid[1] - A) if "late_publishers" in mut else cta
        if publisher and "amax_local" not in mut:
            s_amax = np.zeros(64, np.int32)
            upr = ak_log2 - 3
            units = M << upr
            for base in range(0, units, THREADS):
                u = base + tid
                act = u < units
                m = np.where(act, u >> upr, 0)
                k = (chunk_id << ak_log2) + ((u & ((1 << upr) - 1)) << 3)
                v = load_x8(ctx, m, k, K, vec, bf16, act, "amax x")
                mx = np.abs(v).max(axis=1)
                sel = act & (mx > 0)
                np.maximum.at(s_amax, m[sel], mx[sel].view(np.int32))
            for m in range(M):
                if s_amax[m]:
                    ws[WS_AMAX + m] = max(int(ws[WS_AMAX + m]), int(s_amax[m]))
            yield None
            ws[WS_ARRIVE] += 1
        if "amax_local" in mut:  # a broken exchange: each CTA quantizes with the amax of one k chunk only
            lo = (cta % max(A, 1)) << ak_log2
            ks = np.arange(lo, lo + (1 << ak_log2), 8)
            v = load_x8(ctx, np.repeat(np.arange(M), ks.size), np.tile(ks, M), K, False, bf16, np.ones(M * ks.size, bool), "amax x")
            amax = np.abs(v).reshape(M, -1).max(axis=1).astype(np.float32)
        else:
            while ws[WS_ARRIVE] < A:
                yield (lambda: ws[WS_ARRIVE] >= A)
            amax = ws[WS_AMAX:WS_AMAX + M].view(np.float32).copy()
        s_inv, s_t = token_scales(ctx, amax, ROWS, qmax)
        if "amax_local" not in mut:
            done = int(ws[WS_DONE])
            ws[WS_DONE] = done + 1
            if done == grid[0] * grid[1] - 1:
                ws[WS_AMAX:WS_AMAX + M] = 0
                ws[WS_ARRIVE] = 0
                ws[WS_DONE] = 0
        yield None

    # 3. main loop
    xc_log2 = min(ceil_log2(XK), ceil_log2(64 * nblk))
    xb = 1 << (xc_log2 - 6)
    st = {"next_chunk": 0, "chunk_kk": 0, "chunk": -1, "wr": np.zeros((THREADS, 4), np.uint32)}
    acc = np.zeros((THREADS, mt8, 4), np.int32 if is_int else np.float32)
    P = np.zeros((THREADS, mt8, 4), np.float64 if zq else np.int32)

    def quantize_chunk(blk):
        kbase = (kb0 + blk) * 64
        upr = xc_log2 - 3
        units = ROWS << upr
        for base in range(0, units, THREADS):
            u = base + tid
            act = u < units
            r = np.where(act, u >> upr, 0)
            kl = (u & ((1 << upr) - 1)) << 3
            live = act & (r < M)
            if quik:  # 8 int8 codes as they are; zeros past M and Kq
                q = np.zeros((THREADS, 8), np.uint8)
                got = live & (kbase + kl < K)
                if got.any():
                    q[got] = mem.load(a["xq"], r[got] * K + kbase + kl[got], 8, "chunk xq")
                sm.write(tid[act], (W_BYTES + r * XS + kl)[act], q[act], TAG_X + st["chunk"] + 1, "x chunk store")
                continue
            v = load_x8(ctx, np.where(live, r, 0), kbase + kl, K, vec, bf16, live, "chunk x")
            inv = np.where(live, s_inv[r], np.float32(0))[:, None]
            if zq:  # e4m3(fminf(fmaxf(rn(x * inv), -448), 448)): fmaxf takes -448 over a NaN
                f = fops.mul(v, inv)
                f = np.where(np.isnan(f), np.float32(-448), np.clip(f, -448, 448)).astype(np.float32)
                q = np.where(live[:, None], to_e4m3_bits(f), 0).astype(np.uint8)
                sm.write(tid[act], (W_BYTES + r * XS + kl)[act], q[act], TAG_X + st["chunk"] + 1, "x chunk store")
                continue
            f = fops.f(np.rint(fops.mul(v, inv)))
            f = np.clip(np.where(np.isnan(f), np.float32(0), f), -127, 127)
            q = np.where(live[:, None], f, 0).astype(np.int64).astype(np.int8).view(np.uint8)
            sm.write(tid[act], (W_BYTES + r * XS + kl)[act], q[act], TAG_X + st["chunk"] + 1, "x chunk store")

    def kstep(kk, first):
        nonlocal P
        blk = (kk >> 1) - kb0
        if kk == kk0 or (kk & 1) == 0:
            if blk == st["next_chunk"]:
                if blk != 0:
                    sm.barrier()
                quantize_chunk(blk)
                if "no_barrier" not in mut:
                    sm.barrier()
                st["chunk"] += 1
                st["next_chunk"] += xb
                st["chunk_kk"] = (kb0 + blk) * 2
            if "no_wait" not in mut:
                sm.wait(stages - 2)
            slot = (blk + 1 if "stage_off_by_one" in mut else blk) % stages
            st["wr"] = sm.read(tid, d_w_slot(slot, warp, lane), 16, blk, "decode weight LDS.128").view(np.uint32).reshape(THREADS, 4)
            nb = blk + stages - 1
            if nb < nblk:
                issue(nb)
            sm.commit()
        wr = st["wr"]
        frag = a_frag_fp4 if zq else a_frag
        af = frag(ctx, wr[:, 2], wr[:, 3]) if kk & 1 else frag(ctx, wr[:, 0], wr[:, 1])
        koff = (kk - st["chunk_kk"]) * 32 + 8 * tig
        newP = np.empty_like(P)
        for mt in range(mt8):
            off = W_BYTES + gid * XS + koff + mt * 8 * XS
            bb = sm.read(tid, off, 8, TAG_X + st["chunk"], "decode x LDS.64").view(np.uint32).reshape(THREADS, 2)
            if "k_perm" in mut:  # natural order: b0 = k 4tig.., b1 = k 16+4tig..
                b0 = sm.read(tid, W_BYTES + gid * XS + (kk - st["chunk_kk"]) * 32 + 4 * tig + mt * 8 * XS, 4, TAG_X + st["chunk"], "x").view(np.uint32)[:, 0]
                b1 = sm.read(tid, W_BYTES + gid * XS + (kk - st["chunk_kk"]) * 32 + 16 + 4 * tig + mt * 8 * XS, 4, TAG_X + st["chunk"], "x").view(np.uint32)[:, 0]
                bb = np.stack([b0, b1], -1)
            if zq:
                d = mma_e4m3(af.reshape(WARPS, 32, 4), bb.reshape(WARPS, 32, 2), P[:, mt].reshape(WARPS, 32, 4), zero_c=first)
            else:
                d = mma_m16n8k32(af.reshape(WARPS, 32, 4), bb.reshape(WARPS, 32, 2), P[:, mt].reshape(WARPS, 32, 4),
                                 zero_c=first, a_unsigned="no_sign" in mut)
            newP[:, mt] = d.reshape(THREADS, 4)
        P = newP

    for g in range(g0, g1):
        if g + 1 < g1:
            nsc = scales(g + 1, g)
            if ahead and g + 1 + ahead < g1:
                prefetch(g + 1 + ahead, g)
        kstep(g * spg, True)
        for stp in range(1, spg):
            kstep(g * spg + stp, False)
        for i in range(4):
            if zq:  # w4r::fold1(float&, float, float): acc + rn(P) * 2^e, the product exact
                acc[:, :, i] = fops.add(acc[:, :, i], fops.mul(fops.f(P[:, :, i].astype(np.float32)), sc[:, None, i >> 1]))
            else:
                acc[:, :, i] = fold(ctx, is_int, acc[:, :, i], P[:, :, i], sc[:, None, i >> 1])
        if g + 1 < g1:
            sc = nsc
    sm.wait(0)
    ctx.conflicts.update({k: max(v, ctx.conflicts.get(k, 1)) for k, v in sm.conflicts.items()})

    # 4. split-K, epilogue
    if S > 1:
        red = yield from splitk_reduce(ctx, acc, is_int, s, S, tiles, tile, a["ws"], WS_TILES + tile, tid, ("d", tile))
        if red is None:
            return
        acc = red
    n0 = t16 * 16
    cs = np.zeros((THREADS, 2), np.float32)
    if is_int or zq:  # ZQ: alpha_log2 = 0, cs = cscale
        inv_alpha = np.float32(2.0 ** -a["alpha_log2"])
        cs[:, 0] = fops.mul(mem.load(a["cscale"], (n0 + gid) * 4, 4, "cscale").view(np.float32)[:, 0], inv_alpha)
        cs[:, 1] = fops.mul(mem.load(a["cscale"], (n0 + gid + 8) * 4, 4, "cscale").view(np.float32)[:, 0], inv_alpha)
    zcn = quik_zc(ctx, n0, gid) if quik else None
    accv = c_regs(ctx, acc)
    for mt in range(mt8):
        o = np.zeros((THREADS, 4), np.uint16)
        for i in range(4):
            m = mt * 8 + 2 * tig + (i & 1)
            if zq:  # w4r::out_value<KIND_ZQ>: acc * (t * cs), then LoRC's term where there is one
                v = fops.mul(accv[:, mt, i], fops.mul(s_t[m], cs[:, i >> 1]))
                if a.get("lorc_h"):
                    v = lorc_tail(ctx, v, m, n0 + gid + 8 * (i >> 1), M, N)
            else:
                v = out_value(ctx, is_int, accv[:, mt, i], s_t[m], cs[:, i >> 1])
            if quik:
                v = quik_tail(ctx, v, m, n0 + gid + 8 * (i >> 1), M, N, zcn[:, i >> 1], bf16)
            o[:, i] = f32_to_bits16(v, bf16)
        store_frag(ctx, o, mt * 8, n0, M, N, tid)
        if is_int and a["acc_out"]:
            for i in range(4):
                m = mt * 8 + 2 * tig + (i & 1)
                n = n0 + gid + 8 * (i >> 1)
                sel = (m < M) & (n < N)
                mem.store(a["acc_out"], (m[sel] * N + n[sel]) * 4, accv[sel, mt, i].astype(np.int32).view(np.uint8).reshape(-1, 4), "acc_out")


# ----------------------------------------------------------------------------- prefill


def p_tile(bx: int, by: int, band_log2: int) -> tuple[int, int]:
    """(m tile, n tile) of CTA (blockIdx.x, blockIdx.y): the banded raster.         [w4r::prefill]"""
    return bx >> band_log2, (by << band_log2) + (bx & ((1 << band_log2) - 1))


def prefill_cta(ctx: Ctx, is_int: bool, grid, bx: int, by: int, s: int, quik: bool = False, bm: int = P_BM):
    """Coroutine of one prefill CTA (w4r::prefill<kind, quik, bm>; ``quik``: QUIK's epilogue; ``bm``:
    tokens per CTA, 128 or 64), threads vectorized."""
    a = ctx.args
    mut, fops, mem = ctx.mutations, ctx.fops, ctx.mem
    mti, nti = p_tile(bx, by, a["band_log2"])
    if mti >= a["mtiles"] or nti >= a["ntiles"]:
        return
        yield  # noqa: B901 - a coroutine that ends at once
    nj, x_stage = bm // 16, bm * P_BK     # n8 token tiles per warp, activation bytes per stage
    sm = Shared(p_smem(bm))
    tid = np.arange(THREADS)
    warp, lane = tid >> 5, tid & 31
    gid, tig = lane >> 2, lane & 3
    wn, wm = warp & 3, warp >> 2
    M, N, N128, KB, spg = a["M"], a["N"], a["N128"], a["KB"], a["spg"]
    bf16, sc16 = bool(a["flags"] & 1), bool(a["flags"] & 4)
    m0, t16_0, Kq = mti * bm, nti * 8, KB * 64
    g0, g1 = split_groups(s, a["gq"], a["gr"])
    kk0, kk1 = g0 * spg, g1 * spg
    st0 = kk0 >> 2
    nst = ((kk1 + 3) >> 2) - st0
    swz = "swizzle_off" not in mut

    # the thread's copy plan, worked out once: a stage adds 64 weight chunks and 128 activation bytes
    w_src, w_src_r, w_bit, x_src, x_dst, x_row, x_c = p_copy_plan(tid, t16_0, m0, M, KB, Kq, bm)   # [w4r::prefill]

    def load_stage(i):                                             # [w4r::prefill load_stage]
        buf, kst = i % P_STAGES, st0 + i
        # the zero-filled copies still name a real address (bounds-checked here, their bytes unused)
        okw = 2 * kst + w_bit < KB
        old_fallback = "fallback_stage0" in mut
        wk = np.where(okw, kst * 64, 0 if old_fallback else -32 * w_bit)
        for r in range(2):
            src = np.zeros((THREADS, 16), np.uint8)
            got = mem.load(a["wq"], (w_src + r * w_src_r + wk) * 16, 16, "prefill weight cp.async")
            src[okw] = got[okw]
            sm.cp_async(tid, buf * P_W_STAGE + (tid + r * THREADS) * 16, src, i, "prefill weight cp.async")
        okk = kst * P_BK + x_c * 16 < Kq
        xk = np.where(okk, kst * P_BK, 0 if old_fallback else -16 * x_c)
        for r in range(bm // 32):
            ok = okk & (m0 + x_row + 32 * r < M)
            src = np.zeros((THREADS, 16), np.uint8)
            got = mem.load(a["xq"], x_src[r] + xk, 16, "prefill x cp.async")
            src[ok] = got[ok]
            sm.cp_async(tid, P_W_STAGE * P_STAGES + buf * x_stage + x_dst + r * 32 * P_BK, src, TAG_X + i, "prefill x cp.async")

    for i in range(P_STAGES - 1):
        if i < nst:
            load_stage(i)
        sm.commit()

    acc = np.zeros((THREADS, 2 * nj, 4), np.int32 if is_int else np.float32)  # f = a * nj + j
    P = np.zeros((THREADS, 2 * nj, 4), np.int32)
    n_row0 = (t16_0 + 2 * wn) * 16 + gid
    wr = [np.zeros((THREADS, 4), np.uint32), np.zeros((THREADS, 4), np.uint32)]
    w_off, x_off = p_frag_offsets(wn, wm, lane, swz, bm)

    def begin_stage(i):                                            # [w4r::prefill begin_stage]
        if "no_wait" not in mut:
            sm.wait(P_STAGES - 2)
        if "no_stage_barrier" not in mut:
            sm.barrier()
        if i + P_STAGES - 1 < nst:
            load_stage(i + P_STAGES - 1)
        sm.commit()

    def read_weights(buf, i, b2):
        """Both n16 tiles' 16-byte chunks of k64 block b2 of stage i (in buffer buf): wr[a]."""
        for ai in range(2):
            wr[ai] = sm.read(tid, buf * P_W_STAGE + w_off + (2 * ai + b2) * BLOCK_BYTES, 16, i,
                             "prefill weight LDS.128").view(np.uint32).reshape(THREADS, 4)

    def mma_step(buf, i, ks, odd, c_init):
        """One k step's 2 x nj mma of stage i (in buffer buf), the weights' low or high half; P from
        the constant c_init on a group's first step, else accumulated."""
        nonlocal P
        af = [a_frag(ctx, w[:, 2], w[:, 3]) if odd else a_frag(ctx, w[:, 0], w[:, 1]) for w in wr]
        newP = np.empty_like(P)
        for j in range(nj):
            off = P_W_STAGE * P_STAGES + buf * x_stage + x_off[ks] + j * 8 * P_BK
            bb = sm.read(tid, off, 8, TAG_X + i, "prefill x LDS.64").view(np.uint32).reshape(THREADS, 2)
            for ai in range(2):
                f = ai * nj + j
                c_in = P[:, f] if c_init is None else np.full((THREADS, 4), c_init, np.int32)
                d = mma_m16n8k32(af[ai].reshape(WARPS, 32, 4), bb.reshape(WARPS, 32, 2), c_in.reshape(WARPS, 32, 4),
                                 a_unsigned="no_sign" in mut)
                newP[:, f] = d.reshape(THREADS, 4)
        P = newP

    def end_group(fold_fn):
        for ai in range(2):
            for i2 in range(4):
                sl = slice(ai * nj, (ai + 1) * nj)
                acc[:, sl, i2] = fold_fn(ctx, is_int, acc[:, sl, i2], P[:, sl, i2], sc[ai][:, None, i2 >> 1])

    def kstep(kk, first):
        i = (kk >> 2) - st0
        slot_i = i + 1 if "stage_off_by_one" in mut else i
        buf = slot_i % P_STAGES
        if kk == kk0 or (kk & 3) == 0:
            begin_stage(i)
        if kk == kk0 or (kk & 1) == 0:
            read_weights(buf, i, (kk >> 1) & 1)
        mma_step(buf, i, kk & 3, kk & 1, 0 if first else None)

    def scales_for(g):
        return p_scales(ctx, is_int, g * N128 + n_row0, sc16)

    sc = scales_for(g0)
    if spg == 4:
        # g = 128: a stage is a group; 4 unrolled k steps per stage, the g128 fold  [w4r::prefill g128]
        for i in range(nst):
            slot_i = i + 1 if "stage_off_by_one" in mut else i
            buf, g = slot_i % P_STAGES, g0 + i
            begin_stage(i)
            nsc = scales_for(g + 1) if g + 1 < g1 else None
            for ks in range(4):
                if ks % 2 == 0:
                    read_weights(buf, i, ks >> 1)
                mma_step(buf, i, ks, ks & 1, g128_init(ctx, is_int) if ks == 0 and "g128_carry" not in mut else None)
            end_group(fold_g128)
            if nsc is not None:
                sc = nsc
    else:
        for g in range(g0, g1):
            nsc = scales_for(g + 1) if g + 1 < g1 else None
            kstep(g * spg, True)
            for stp in range(1, spg):
                kstep(g * spg + stp, False)
            end_group(fold)
            if nsc is not None:
                sc = nsc
    sm.wait(0)
    ctx.conflicts.update({k: max(v, ctx.conflicts.get(k, 1)) for k, v in sm.conflicts.items()})
    yield None

    tile = mti * a["ntiles"] + nti
    if a["S"] > 1:
        red = yield from splitk_reduce(ctx, acc, is_int, s, a["S"], a["mtiles"] * a["ntiles"], tile, a["counters"], tile, tid, ("p", tile))
        if red is None:
            return
        acc = red
    accv = c_regs(ctx, acc)
    for ai in range(2):
        n0 = (t16_0 + 2 * wn + ai) * 16
        cs = np.zeros((THREADS, 2), np.float32)
        if is_int:
            inv_alpha = np.float32(2.0 ** -a["alpha_log2"])
            cs[:, 0] = fops.mul(mem.load(a["cscale"], (n0 + gid) * 4, 4, "cscale").view(np.float32)[:, 0], inv_alpha)
            cs[:, 1] = fops.mul(mem.load(a["cscale"], (n0 + gid + 8) * 4, 4, "cscale").view(np.float32)[:, 0], inv_alpha)
        zcn = quik_zc(ctx, n0, gid) if quik else None
        for j in range(nj):
            m_base = m0 + wm * (bm // 2) + j * 8
            o = np.zeros((THREADS, 4), np.uint16)
            for i in range(4):
                m = m_base + 2 * tig + (i & 1)
                tm = np.zeros(THREADS, np.float32)
                sel = m < M
                if sel.any():
                    tm[sel] = mem.load(a["t"], m[sel] * 4, 4, "t").view(np.float32)[:, 0]
                v = out_value(ctx, is_int, accv[:, ai * nj + j, i], tm, cs[:, i >> 1])
                if quik:
                    v = quik_tail(ctx, v, m, n0 + gid + 8 * (i >> 1), M, N, zcn[:, i >> 1], bf16)
                o[:, i] = f32_to_bits16(v, bf16)
            store_frag(ctx, o, m_base, n0, M, N, tid)
            if is_int and a["acc_out"]:
                for i in range(4):
                    m = m_base + 2 * tig + (i & 1)
                    n = n0 + gid + 8 * (i >> 1)
                    sel = (m < M) & (n < N)
                    mem.store(a["acc_out"], (m[sel] * N + n[sel]) * 4, accv[sel, ai * nj + j, i].astype(np.int32).view(np.uint8).reshape(-1, 4), "acc_out")


# ----------------------------------------------------------------------------- quantizer


def quantize_rows(ctx: Ctx, grid, bf16: bool):
    """qk::quantize_row for every row (a CTA per row; the reductions are order-free maxima)."""
    a = ctx.args
    M, K, Kq = a["M"], a["K"], a["Kq"]
    fops, mem = ctx.fops, ctx.mem
    conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
    for m in range(min(grid[0], M)):
        x = fops.f(conv(mem.load(a["x"], (m * K + np.arange(K)) * 2, 2, "quantizer x").view(np.uint16)[:, 0]))
        amax = np.float32(np.abs(x).max()) if K else np.float32(0)
        inv = fops.mul(fops.rcp(amax), np.float32(127)) if amax > 0 else np.float32(0)
        f = fops.f(np.rint(fops.mul(x, inv)))
        q = np.clip(np.where(np.isnan(f), np.float32(0), f), -127, 127).astype(np.int64).astype(np.int8)
        row = np.zeros(Kq, np.int8)
        row[:K] = q
        mem.store(a["xq"], m * Kq + np.arange(Kq), row.view(np.uint8)[:, None], "quantizer xq")
        mem.store(a["t"], np.array([m * 4]), np.asarray([fops.div(amax, 127.0)], np.float32).view(np.uint8)[None, :], "quantizer t")


# ----------------------------------------------------------------------------- ZQ LoRC


def lorc_tail(ctx: Ctx, v, m, n, M: int, N: int):
    """w4r::lorc_tail per thread: fl(v + z), z = sum_r fl(h[m, r] u[n, r]) in r order from 0.0; nothing
    read for outputs past M or N.                                                   [w4r::lorc_tail]"""
    a, f, mem = ctx.args, ctx.fops, ctx.mem
    R = a["lorc_r"]
    m, n = np.broadcast_to(np.asarray(m, np.int64), v.shape), np.asarray(n, np.int64)
    ok = (m < M) & (n < N)
    if not ok.any():
        return v
    nu = (n ^ 1) if "lorc_u_row" in ctx.mutations else n
    z = np.zeros(int(ok.sum()), np.float32)
    for r in range(R):
        h = mem.load(a["lorc_h"], (m[ok] * R + r) * 4, 4, "lorc h").view(np.float32)[:, 0]
        u = mem.load(a["lorc_u"], (nu[ok] * R + r) * 4, 4, "lorc u").view(np.float32)[:, 0]
        z = f.add(z, f.mul(h, u))
    out = np.array(v, np.float32, copy=True)
    out[ok] = f.add(out[ok], z)
    return out


def lorc_h(ctx: Ctx, grid):
    """w4a8r_lorc_h_zq for every token: the E4M3 quantization the decode kernel makes, xd = fl(xq t), the
    256 threads' ordered sums, the xor butterfly, the warps in order.                    [zq lorc_h]"""
    a, f, mem = ctx.args, ctx.fops, ctx.mem
    M, K, R, bf16 = a["M"], a["K"], a["R"], bool(a["flags"] & 1)
    if not 0 < R <= LORC_MAX_R:
        raise EmulationError(f"w4a8r_lorc_h_zq: R = {R} outside 1..{LORC_MAX_R}")
    conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
    steps = -(-K // THREADS)
    for m in range(min(grid[0], M)):
        x = f.f(conv(mem.load(a["x"], (m * K + np.arange(K)) * 2, 2, "lorc x").view(np.uint16)[:, 0]))
        amax = np.float32(np.fmax.reduce(np.abs(x))) if K else np.float32(0)
        inv, t = token_scales(ctx, np.array([amax], np.float32), 1, 448.0)
        q = f.mul(x, inv[0])
        q = np.where(np.isnan(q), np.float32(-448), np.clip(q, -448, 448)).astype(np.float32)
        xd = f.mul(e4m3_values(to_e4m3_bits(q).astype(np.uint32)[:, None])[:, 0, 0].astype(np.float32), t[0])
        vv = f16_bits_to_f32(mem.load(a["v"], (np.arange(R)[:, None] * K + np.arange(K)[None]).reshape(-1) * 2, 2,
                                      "lorc v").view(np.uint16)[:, 0]).reshape(R, K)
        part = np.zeros((THREADS, R), np.float32)
        for j in range(steps):
            k = j * THREADS + np.arange(THREADS)
            live = k < K
            kk = np.where(live, k, 0)
            prod = f.mul(xd[kk][:, None], vv[:, kk].T)
            part = np.where(live[:, None], f.add(part, prod), part)
        lanes = part.reshape(8, 32, R)
        if "lorc_lanes" in ctx.mutations:
            w = lanes[:, 0]
            for ln in range(1, 32):
                w = f.add(w, lanes[:, ln])
        else:
            for o in (16, 8, 4, 2, 1):
                lanes = f.add(lanes, lanes[:, np.arange(32) ^ o])
            w = lanes[:, 0]
        h = w[0]
        for wi in range(1, 8):
            h = f.add(h, w[wi])
        mem.store(a["h"], (m * R + np.arange(R)) * 4, h.astype(np.float32).view(np.uint8).reshape(R, 4), "lorc h store")


# ----------------------------------------------------------------------------- ZQ widening


def widen_zq(ctx: Ctx, grid):
    """w4a8r_widen_zq for the whole grid at once (no shared memory, one 16-byte chunk per thread):
    w8[n, k0 .. k0 + 7] = e4m3(w * 2^ew[g, n]) of each repacked word, by the kernel's index math, the
    E2M1 -> E4M3 widening as fp4x8r_to_e4m3 runs it and the float product rounded by cvt.  [zq widen]"""
    a, mem, mut = ctx.args, ctx.mem, ctx.mutations
    N16, N128, KB = a["N16"], a["N128"], a["KB"]
    bx, t16, tid = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), np.arange(THREADS), indexing="ij")
    i = (bx * THREADS + tid).reshape(-1)
    t16 = t16.reshape(-1)
    live = i < KB * 32
    i, t16 = i[live], t16[live]
    kb, lane = i >> 5, i & 31
    gid, tig = lane >> 2, lane & 3
    words = mem.load(a["wq"], (t16 * KB * 32 + i) * 16, 16, "widen weight load").view(np.uint32).reshape(-1, 4)
    Kq = KB * 64
    for j in range(4):
        n = 16 * t16 + gid + (0 if "widen_row" in mut else 8 * (j & 1))
        ks = 2 * kb + (j >> 1)
        sel = n < N16
        g = mem.load(a["step_group"], ks[sel] * 4, 4, "step_group").view(np.int32)[:, 0]
        if "widen_group" in mut:
            g = mem.load(a["step_group"], np.minimum(ks[sel] + 1, 2 * KB - 1) * 4, 4, "step_group").view(np.int32)[:, 0]
        e = mem.load(a["ew"], g.astype(np.int64) * N128 + n[sel], 1, "widen exponent").view(np.int8)[:, 0].astype(np.int32)
        p = np.ldexp(np.float32(1), e).astype(np.float32)
        lo, hi = fp4x8r_to_e4m3(ctx, words[sel, j])
        vals = e4m3_values(np.stack([lo, hi], -1)).reshape(-1, 8).astype(np.float32)   # exact: E4M3 normals or 0
        out = to_e4m3_bits(ctx.fops.mul(vals, p[:, None]))
        mem.store(a["w8"], n[sel] * Kq + 32 * ks[sel] + 8 * tig[sel], out.reshape(-1, 8), "widen 8-byte store")


# ----------------------------------------------------------------------------- launches


def source_defines(source) -> dict:
    """``_source_defines`` of the launched file, read once per version of it (its path and mtime)."""
    if source is None:
        return {}
    path = Path(source)
    return _source_defines(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _source_defines(path: str, mtime_ns: int) -> dict:
    """The W4R_ build macros (W4R_SCALE_AHEAD, W4R_D_STAGES) as the launched file defines them first (a
    build variant of benchmarks/decode_variants.py puts its own before the source's defaults): the
    Ctx fields they set; those a file does not define (fp8_repacked.cu, which includes
    w4a8_repacked.cu, or no file named) keep their defaults."""
    text = Path(path).read_text()
    out = {}
    for macro, fld in (("W4R_SCALE_AHEAD", "scale_ahead"), ("W4R_D_STAGES", "d_stages")):
        m = re.search(rf"^#define {macro} (\d+)", text, re.M)
        if m:
            out[fld] = int(m.group(1))
    return out


def decode_ahead(ctx: Ctx, zq: bool, mt8: int) -> int:
    """Groups the decode prefetches its scales ahead: W4R_SCALE_AHEAD, but none in the ZQ kernel of 64
    rows (register cap).                                                       [w4r::decode AHEAD]"""
    return 0 if zq and mt8 == 8 else ctx.scale_ahead


def check_scale_schedule(name: str, log: list, grid, gq: int, gr: int, ahead: int) -> None:
    """The decode's group scales, CTA by CTA: each group of the split read once, group g0 before the
    loop and group g at iteration g - 1 (one group ahead), and each later group's line prefetched
    once, ``ahead`` groups before its read (before the loop where that is earlier); nothing else."""
    S = grid[0]
    for cta in range(grid[0] * grid[1]):
        g0, g1 = split_groups(cta % S, gq, gr)
        want = {("load", g, g - 1 if g > g0 else -1) for g in range(g0, g1)}
        if ahead:
            want |= {("prefetch", h, h - 1 - ahead if h - 1 - ahead >= g0 else -1) for h in range(g0 + 1, g1)}
        got = [e[1:] for e in log if e[0] == cta]
        if len(got) != len(set(got)) or set(got) != want:
            extra, missing = sorted(set(got) - want), sorted(want - set(got))
            raise EmulationError(f"{name}: CTA {cta}'s scale reads / prefetches are off the schedule "
                                 f"(groups {g0}..{g1 - 1}, {ahead} ahead): extra {extra[:3]}, missing {missing[:3]}")


@dataclass
class Emulator:
    """The launch hook: runs each launch of w4a8_repacked.cu on the CPU with the checks above."""

    mutations: frozenset = frozenset()
    seed: int = 0
    resident: int | None = None       # CTAs resident at once (grid order); default: the SM count
    launches: list = field(default_factory=list)
    conflicts: dict = field(default_factory=dict)
    ticket_orders: list = field(default_factory=list)
    amax_paths: list = field(default_factory=list)   # per launch: {"own" / "exchange": CTAs}
    prefetches: list = field(default_factory=list)   # per decode launch: scale prefetches issued (all CTAs)

    def __call__(self, name, grid, block, args, shared_mem, source):
        unknown = set(self.mutations) - MUTATIONS
        if unknown:
            raise ValueError(f"unknown mutations {sorted(unknown)}")
        grid = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
        if tuple(block) != (THREADS,) and not name.startswith("w4a8r_quantize"):
            raise EmulationError(f"{name}: launched with block {block}, the kernel is written for {THREADS} threads")
        zq_kernel = name.startswith("w4a8r_decode_zq_") or name in ("w4a8r_widen_zq", "w4a8r_lorc_h_zq")
        if source is not None and Path(source).name != ("fp8_repacked.cu" if zq_kernel else "w4a8_repacked.cu"):
            raise EmulationError(f"{name}: launched from {Path(source).name}, which does not define it")
        mem = Global()
        if name.startswith("w4a8r_decode_quik_"):
            params = QUIK_DECODE_PARAMS
        elif name.startswith("w4a8r_decode_zq_"):
            params = ZQ_DECODE_PARAMS
        elif name == "w4a8r_lorc_h_zq":
            params = LORC_H_PARAMS
        elif name.startswith("w4a8r_decode_"):
            params = DECODE_PARAMS
        elif name == "w4a8r_prefill_quik":
            params = QUIK_PREFILL_PARAMS
        elif name.startswith("w4a8r_prefill_"):
            params = PREFILL_PARAMS
        elif name.startswith("w4a8r_quantize_"):
            params = QUANT_PARAMS
        elif name == "w4a8r_widen_zq":
            params = WIDEN_PARAMS
        else:
            raise EmulationError(f"no emulation of kernel {name}")
        if len(args) != len(params):
            raise EmulationError(f"{name}: {len(args)} arguments, the kernel takes {len(params)}")
        vals = {p: int(v) for p, v in zip(params, args)}
        ctx = Ctx(mem, vals, frozenset(self.mutations), FloatOps("ftz" in self.mutations), **source_defines(source))
        self.launches.append((name, grid, shared_mem, dict(vals)))
        rng = random.Random(self.seed * 1_000_003 + len(self.launches))
        resident = self.resident or launch.emulated_sm_count()
        if name.startswith("w4a8r_quantize_"):
            quantize_rows(ctx, grid, name.endswith("bf16"))
            return
        if name == "w4a8r_lorc_h_zq":
            if shared_mem or grid[0] < vals["M"]:
                raise EmulationError(f"{name}: grid {grid} does not cover M = {vals['M']}")
            mem.track(vals["h"])
            lorc_h(ctx, grid)
            w = mem.writes[vals["h"]][: vals["M"] * vals["R"] * 4]
            if not (w == 1).all():
                raise EmulationError(f"{name}: h byte {int(np.flatnonzero(w != 1)[0])} written {int(w[np.flatnonzero(w != 1)[0]])} times")
            return
        if name == "w4a8r_widen_zq":
            if shared_mem or grid[1] != vals["N16"] // 16 or grid[0] * THREADS < vals["KB"] * 32:
                raise EmulationError(f"{name}: grid {grid} / {shared_mem} bytes of shared memory do not fit the kernel")
            mem.track(vals["w8"])
            widen_zq(ctx, grid)
            w = mem.writes[vals["w8"]][: vals["N16"] * vals["KB"] * 64]
            if not (w == 1).all():
                bad = int(np.flatnonzero(w != 1)[0])
                raise EmulationError(f"{name}: w8 byte {bad} written {int(w[bad])} times")
            return
        mem.track(vals["y"])
        if vals.get("acc_out"):
            mem.track(vals["acc_out"])
        quik = "_quik" in name
        zq = "_zq_" in name
        is_int = "_is" in name or quik
        if name.startswith("w4a8r_decode_"):
            mt8 = int(name.rsplit("_m", 1)[1]) // 8
            if shared_mem != decode_smem(mt8, ctx.d_stages):
                raise EmulationError(f"{name}: {shared_mem} bytes of dynamic shared memory, the kernel uses "
                                     f"{decode_smem(mt8, ctx.d_stages)}")
            if vals["M"] > 8 * mt8 or grid[2] != 1 or grid[0] != vals["S"]:
                raise EmulationError(f"{name}: M={vals['M']} or grid {grid} does not fit the kernel")
            if quik and vals["A"] != 0:
                raise EmulationError(f"{name}: A = {vals['A']}: the QUIK decode takes no amax")
            if zq and (vals["alpha_log2"] != 0 or vals["acc_out"]):
                raise EmulationError(f"{name}: the ZQ decode takes alpha_log2 = 0 and no acc_out")
            programs = [decode_cta(ctx, mt8, is_int, grid, s, tile, quik, zq) for tile in range(grid[1]) for s in range(grid[0])]
            run_grid(programs, resident, rng)
            check_scale_schedule(name, ctx.scale_log, grid, vals["gq"], vals["gr"], decode_ahead(ctx, zq, mt8))
            self.prefetches.append(sum(e[1] == "prefetch" for e in ctx.scale_log))
            ws = mem.view(vals["ws"]).view(np.int32)
            if ws.any():
                raise EmulationError(f"{name}: workspace not back to zero after the launch ({np.flatnonzero(ws)[:8]})")
        else:
            bm = int(name.rsplit("_bm", 1)[1]) if "_bm" in name else P_BM
            if bm not in PREFILL_BMS or (quik and bm != P_BM):
                raise EmulationError(f"no emulation of kernel {name}")
            if shared_mem != p_smem(bm):
                raise EmulationError(f"{name}: {shared_mem} bytes of dynamic shared memory, the kernel uses {p_smem(bm)}")
            programs = [prefill_cta(ctx, is_int, grid, bx, by, bz, quik, bm)
                        for bz in range(grid[2]) for by in range(grid[1]) for bx in range(grid[0])]
            run_grid(programs, resident, rng)
        for k, v in ctx.conflicts.items():
            self.conflicts[k] = max(v, self.conflicts.get(k, 1))
        self.ticket_orders.append(dict(ctx.ticket_log))
        self.amax_paths.append(dict(ctx.amax_paths))
        # every output element written exactly once
        M, N = vals["M"], vals["N"]
        for key, width in (("y", 2), ("acc_out", 4)):
            if vals.get(key):
                w = mem.writes[vals[key]][: M * N * width].reshape(M * N, width)
                if not (w == 1).all():
                    bad = np.flatnonzero((w != 1).any(axis=1))[0]
                    raise EmulationError(f"{name}: {key}[{bad // N}, {bad % N}] written {int(w[bad].max())} times")


@contextlib.contextmanager
def emulating(sm_count: int = 8, **kwargs):
    """Run ``cuda.linear`` (and any launch of w4a8_repacked.cu) on the CPU emulator; yields the
    ``Emulator`` (its ``launches``, bank ``conflicts`` per access site, ``ticket_orders``)."""
    emu = Emulator(**kwargs)
    with launch.launch_hook(emu, sm_count=sm_count):
        yield emu
