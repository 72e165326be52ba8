"""Lane-exact CPU emulator of the ZeroQuant-FP kernels (fp8_gemm.cu): the per-token FP8
quantizer and the FP4 x FP8 and FP8 x FP8 GEMMs on FP8 tensor cores.

The same machinery as the other emulators (w4a8/emulate.py, quik/emulate.py): the real launchers
(``fp8.cuda.quantize_per_token_fp8``, ``fp4_fp8_gemm``, ``fp8_fp8_gemm``) run with their launches
routed here through ``launch.launch_hook``; 128 threads' registers as arrays; global memory
reached only through the launcher's pointers (bounds, alignment); shared memory with per-byte
provenance (stage, writer, barrier interval: RAW / WAR races, stale bytes); the fragments of
``mma.m16n8k32.row.col.f32.e4m3.e4m3.f32`` placed by the PTX ISA tables the 8-bit types share;
the FP4 -> E4M3 widening as the kernel's own PRMT table lookup; every float operation after the
tensor cores rounded once to float32 in the kernel's order; every output written exactly once.

One thing is modelled, not emulated: the tensor cores' accumulator.  PTX leaves the alignment
and rounding inside an FP8 mma unspecified, so this emulator keeps the group partial P exact
(float64: E4M3 products have at most 8 significant bits and lie in 2^-18 .. 2^18, so sums of up
to 2^17 of them are exact) and rounds it once when the fold reads it, which is the reference's
definition.  Equality with the reference here therefore proves the data movement, fragment
layout, K permutation, widening, group / chunk folds and epilogue; the GPU tests add the
hardware's own accumulation, within the tolerance reference.py states.
"""

from __future__ import annotations

import numpy as np

from qconvert_kernels.quik.emulate import (A_STRIDE, BK, BM, BN, MT, NT, THREADS, GroupFold, StaticEmulator, _a_regs, _frag8,
                                           _load, _threads, _written_once, byte_perm, check_tiles, column_values,
                                           fragment_outputs, group_steps, run_stages, stage_load, stage_store)
from qconvert_kernels.w4a8.emulate import (Ctx, EmulationError, FloatOps, Shared, bf16_bits_to_f32,  # noqa: F401 (re-exported)
                                           e4m3_values, f16_bits_to_f32, f32_to_bits16, mma_e4m3, store_pair, to_e4m3_bits)

B4_STRIDE = 48
QUANT_THREADS = 256
FP8_MAX = np.float32(448.0)
T_LO, T_HI = 0x3C383000, 0x4C484440  # zq::fp4x8_to_e4m3's table: E2M1 magnitudes 0..7 as E4M3 bytes

FP4_PARAMS = ("xq", "t", "qw", "sexp", "cscale", "y", "M", "N", "Kp", "group_size")
FP8_PARAMS = ("xq", "t", "qw", "wscale", "y", "M", "N", "Kp")
QUANT_PARAMS = ("x", "xq", "t", "M", "K", "Kp")

MUTATIONS = frozenset({
    "swap_a",          # a[1] and a[2] exchanged in the A fragments
    "no_tail_sync",    # the trailing __syncthreads of a stage left out
    "fp4_table",       # the widening table with codes 5 and 6 (3.0 and 4.0: E4M3 0x44, 0x48) exchanged
    "fp4_sign",        # the sign taken from bit 4 of the unpacked byte instead of bit 3
    "scale_stale",     # after a fold, the exponents of the group just folded are loaded again
    "quant_short",     # the quantizer writes only the K real columns, not the padding up to Kp
})

def fp4x8_to_e4m3(ctx: Ctx, w):
    """8 packed E2M1 codes -> (b0, b1) E4M3 bytes in k order, as zq::fp4x8_to_e4m3 computes them."""
    w = np.asarray(w, np.uint32)
    t_lo, t_hi = (T_LO, T_HI) if "fp4_table" not in ctx.mutations else (T_LO, 0x4C444840)
    lo = w & np.uint32(0x0F0F0F0F)
    hi = (w >> np.uint32(4)) & np.uint32(0x0F0F0F0F)
    e0, e1 = byte_perm(lo, hi, 0x5140), byte_perm(lo, hi, 0x7362)
    shift = np.uint32(3 if "fp4_sign" in ctx.mutations else 4)
    sign = np.uint32(0x80808080)
    b0 = byte_perm(np.full_like(w, t_lo), np.full_like(w, t_hi), w & np.uint32(0x7777)) | ((e0 << shift) & sign)
    b1 = byte_perm(np.full_like(w, t_lo), np.full_like(w, t_hi), (w >> np.uint32(16)) & np.uint32(0x7777)) | ((e1 << shift) & sign)
    return b0, b1


def mainloop(ctx: Ctx, fp4: bool, M: int, N: int, Kp: int, group_size: int, bm: int, bn: int, fold):
    """zq::mainloop: e4m3 activations [M, Kp] against packed E2M1 [N, Kp / 2] (fp4) or e4m3 [N, Kp];
    ``fold(j, P)`` closes group j (and zeroes P)."""
    tid, gid, tig, wm, wn = _threads()
    sb = BM * A_STRIDE
    sm = Shared(sb + BN * (B4_STRIDE if fp4 else A_STRIDE))
    P = np.zeros((THREADS, MT, NT, 4), np.float64)
    bw = BK // 2 if fp4 else BK  # weight bytes per stage row

    def load(s):                                                          # [zq::load_stage]
        return (stage_load(ctx, ctx.args["xq"], bm, M, s * BK, Kp, BK, "xq stage"),
                stage_load(ctx, ctx.args["qw"], bn, N, s * bw, Kp * bw // BK, bw, "weight stage"))

    def store(regs, s):                                                   # [zq::store_stage]
        stage_store(sm, regs[0], 0, A_STRIDE, BK, s, "fp8 A STS.128")
        stage_store(sm, regs[1], sb, B4_STRIDE if fp4 else A_STRIDE, bw, s, "fp8 B STS.128")

    after = group_steps(Kp, group_size, fold)

    def kstep(s, ks):
        a = _a_regs(ctx, sm, tid, gid, tig, wm, ks, s, "fp8 A LDS.64")
        b = np.zeros((THREADS, NT, 2), np.uint32)
        for nt in range(NT):
            row = wn + nt * 8 + gid
            if fp4:
                w = np.ascontiguousarray(sm.read(tid, sb + row * B4_STRIDE + ks * 16 + 4 * tig, 4, s,
                                                 "fp4 B LDS.32")).view(np.uint32)[:, 0]
                b[:, nt] = np.stack(fp4x8_to_e4m3(ctx, w), -1)
            else:
                b[:, nt] = np.stack(_frag8(sm, tid, sb, row, ks * 32 + 8 * tig, A_STRIDE, s, "fp8 B LDS.64"), -1)
        for mt in range(MT):
            for nt in range(NT):
                P[:, mt, nt] = mma_e4m3(a[:, mt].reshape(-1, 32, 4), b[:, nt].reshape(-1, 32, 2),
                                        P[:, mt, nt].reshape(-1, 32, 4)).reshape(THREADS, 4)
        after(s, ks, P)

    run_stages(ctx, sm, -(-Kp // BK), load, store, kstep)


def pow2_fold(ctx: Ctx, N: int, G: int, bn: int) -> GroupFold:
    """zq::FoldPow2: acc = acc + fl32(P) * 2^sexp[n, j] (an exact product, one rounding), in group order."""
    def scale_of(idx):
        e = _load(ctx, ctx.args["sexp"], idx, np.int8, "sexp").astype(np.int64)
        return np.ldexp(np.float32(1), e).astype(np.float32)

    return GroupFold(ctx, False, N, G, bn, scale_of, "scale_stale")


class FoldSum:
    """zq::FoldSum, every 64 k: acc = acc + fl32(P) (one rounding), in k order."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.acc = np.zeros((THREADS, MT, NT, 4), np.float32)

    def __call__(self, j: int, P):
        self.acc = self.ctx.fops.add(self.acc, P.astype(np.float32))
        P[...] = 0


def epilogue(ctx: Ctx, acc, scale_ptr, bf16: bool, M: int, N: int, bm: int, bn: int):
    """zq::epilogue: y = acc * (t[m] * scale[n]), each product rounded."""
    f = ctx.fops
    for nt, n, rows in fragment_outputs(M, N, bm, bn):
        sc = column_values(ctx, scale_ptr, n, N, np.float32, "scale")
        for mt, h, m, t in rows:
            tm = _load(ctx, ctx.args["t"], m[t], np.float32, "t")
            y0 = f.mul(acc[t, mt, nt, 2 * h], f.mul(tm, sc[0][t]))
            y1 = f.mul(acc[t, mt, nt, 2 * h + 1], f.mul(tm, sc[1][t]))
            store_pair(ctx, m[t], n[t], N, f32_to_bits16(y0, bf16), f32_to_bits16(y1, bf16))


def quantize_rows(ctx: Ctx, grid, bf16: bool):
    """zq::quantize_row for every row (one CTA per row; the maximum is order-free)."""
    a, f = ctx.args, ctx.fops
    M, K, Kp = a["M"], a["K"], a["Kp"]
    conv = bf16_bits_to_f32 if bf16 else f16_bits_to_f32
    for m in range(min(grid[0], M)):
        x = f.f(conv(_load(ctx, a["x"], m * K + np.arange(K), np.uint16, "x")))
        amax = np.float32(np.fmax.reduce(np.abs(x), initial=np.float32(0)))
        inv = f.mul(f.rcp(amax), FP8_MAX) if amax > 0 else np.float32(0)
        q = np.zeros(Kp, np.uint8)
        q[:K] = to_e4m3_bits(np.fmin(np.fmax(f.mul(x, inv), -FP8_MAX), FP8_MAX))
        width = K if "quant_short" in ctx.mutations else Kp
        ctx.mem.store(a["xq"], m * Kp + np.arange(width), q[:width, None], "xq")
        ctx.mem.store(a["t"], np.array([m * 4]), np.asarray([f.div(amax, 448.0)], np.float32).view(np.uint8)[None, :], "t")


class Emulator(StaticEmulator):
    """The launch hook of fp8_gemm.cu's kernels."""

    KERNELS = (("quantize_per_token_fp8_", QUANT_PARAMS, QUANT_THREADS), ("fp4_fp8_gemm_", FP4_PARAMS, THREADS),
               ("fp8_fp8_gemm_", FP8_PARAMS, THREADS))
    KNOWN = MUTATIONS

    def run(self, name, grid, ctx):
        mem, vals = ctx.mem, ctx.args
        bf16 = name.endswith("_bf16")
        M = vals["M"]
        if name.startswith("quantize_per_token_fp8_"):
            mem.track(vals["xq"])
            mem.track(vals["t"])
            quantize_rows(ctx, grid, bf16)
            _written_once(name, mem, vals["xq"], M * vals["Kp"], 1, "xq")
            _written_once(name, mem, vals["t"], M, 4, "t")
            return
        N, Kp = vals["N"], vals["Kp"]
        check_tiles(name, grid, M, N)
        mem.track(vals["y"])
        fp4 = name.startswith("fp4_")
        for by in range(grid[1]):
            for bx in range(grid[0]):
                bm, bn = by * BM, bx * BN
                if fp4:
                    fold = pow2_fold(ctx, N, Kp // vals["group_size"], bn)
                    mainloop(ctx, True, M, N, Kp, vals["group_size"], bm, bn, fold)
                    epilogue(ctx, fold.acc, vals["cscale"], bf16, M, N, bm, bn)
                else:
                    fold = FoldSum(ctx)
                    mainloop(ctx, False, M, N, Kp, BK, bm, bn, fold)
                    epilogue(ctx, fold.acc, vals["wscale"], bf16, M, N, bm, bn)
        _written_once(name, mem, vals["y"], M * N, 2, "y")


def emulating(**kwargs):
    """Run the ZeroQuant-FP launchers on the CPU emulator; yields the ``Emulator``."""
    return Emulator.hooked(**kwargs)
