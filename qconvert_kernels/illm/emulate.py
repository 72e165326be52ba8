"""CPU emulator of the I-LLM kernels of illm_gemm.cu: the row kernels (``illm_requant_rows``,
``illm_softmax``, ``illm_rmsnorm``, ``illm_rope_requant``, ``illm_swiglu``, ``illm_residual_norm``,
``illm_attention``, ``illm_heads_requant``, ``illm_hadamard``) and DI-MatMul's epilogue after
torch._int_mm (``illm_dyadic_rows``) here, DI-MatMul's tile kernels and GEMVs through the main loops
of quik/emulate.py.

The row kernels are integer code: one CTA of 256 threads per row, strided loops, block max / sum
reductions (order-free on integers), and divisions done only by ``qk::udiv_u64`` (restoring long
division) and ``qk::DivBy`` (multiplication by a precomputed reciprocal, exact below a stated
numerator bound).  The emulator runs the kernels' own scalar expressions on Python integers, with
the two divisions transcribed from common.cuh, and checks what the hardware would not: every
int64 intermediate must stay inside int64 (``EmulationError`` otherwise), every DivBy numerator
inside the bound its ``init`` was given, every global access inside its tensor, every output
written exactly once.  The launchers (``illm.cuda.requant_rows``, ``softmax``, ``rmsnorm``,
``rope_requant``, ``swiglu``, ``residual_norm``, ``attention``, ``heads_requant``, ``hadamard``,
``illm_matmul``) run unchanged through ``launch.launch_hook``.
"""

from __future__ import annotations

import numpy as np

from qconvert_kernels.quik.emulate import Emulator as _Bytes64
from qconvert_kernels.quik.emulate import MUTATIONS as _BYTES_MUTATIONS
from qconvert_kernels.quik.emulate import _illm_kmin, _load, _rshift_round, _written_once
from qconvert_kernels.w4a8.emulate import Ctx, EmulationError

ROW_THREADS = 256
MANT = 16
EXP_F = 16
EXP_A = 43267
EXP_B = 65536 - EXP_A
LOG2E_M, LOG2E_K = 47274, 15
PROB_BITS = 15
ROPE_BITS = 14
CLIP_BITS = 16
MASK64 = (1 << 64) - 1

DYADIC_PARAMS = ("acc", "wm", "wk", "kmin_p", "t", "xk", "tk", "M", "N", "ld", "n1", "n2")
REQUANT_PARAMS = ("v", "q", "sm", "sk", "rows", "n", "qmax", "clip", "fm", "fk", "folds", "cm", "ck")
SOFTMAX_PARAMS = ("scores", "valid", "sm", "sk", "umax", "P", "rows", "T")
RMSNORM_PARAMS = ("x", "gamma", "gk", "qmax", "q", "sm", "sk", "rows", "H", "clip")
ROPE_PARAMS = ("t", "fm", "fk", "fold", "cos", "sin", "pos", "rope", "om", "ok", "ofold", "q", "sm", "sk", "col", "stride",
               "rows", "L", "ld", "sub", "d", "qmax")
SWIGLU_PARAMS = ("tg", "gm", "gk", "tu", "um", "uk", "umax", "qmax", "a", "sgm", "sgk", "sum", "suk", "rows", "n", "ld")
RESIDUAL_PARAMS = ("x", "xm", "xk", "b", "bm", "bk", "qmax", "h", "hm", "hk", "gamma", "gk", "nqmax", "clip", "q", "sm", "sk",
                   "rows", "n")
ATTENTION_PARAMS = ("q", "qm", "qk", "k8", "km", "kk", "v8", "vm", "vk", "mask", "mask_hr", "sdm", "sdk", "umax", "ps",
                    "o", "e", "T", "group", "n", "d", "qdiv")
HADAMARD_PARAMS = ("x", "sign", "t", "y", "rows", "m", "lp")
HEADS_PARAMS = ("o", "e", "qmax", "clip", "q", "sm", "sk", "rows", "heads", "t", "d")
NO_EXPONENT = 1 << 40
WIDE_QMAX = 32767

MUTATIONS = _BYTES_MUTATIONS | frozenset({
    "divby_short",     # DivBy initialised for 32-bit numerators where the kernel needs 48
    "round_down",      # rshift_round without its half (truncating shifts)
    "exp_no_square",   # DI-Exp without the quadratic term
    "requant_no_clip", # requant_row ignoring its activation clip
    "wide_no_fold",    # illm_rope_requant's 16-bit ratio without its fold
    "rope_sin_sign",   # RoPE's first half adding x2 sin instead of subtracting it
    "rope_pos0",       # RoPE at row 0's position for every row
    "rope_column0",    # keys written into a cache at column 0, not the step's column
    "silu_sign",       # SiLU taking sigmoid(|x|) for negative x too
    "swiglu_unfolded", # SwiGLU's SiLU on the gate's ratio alone, not times the gate's scale
    "residual_zero_k", # the residual add aligning to a zero term's exponent 0 (min of both exponents)
    "norm_stale_h",    # the fused norm reading the residual x instead of the sum h it wrote
    "attn_unmasked",   # attention's key exponent taken over every column, not the row's seen ones
    "attn_pv_group0",  # P V summing the first column group only
    "attn_max_live",   # the softmax max over keys with a non-zero scale only (a zero-scale key's 0 left out)
    "attn_scratch_shared",  # attention's scratch without the row's offset (every CTA's passes in row 0's slots)
    "attn_qrow_hh",    # attention reading the query scale of row hh, not hh / qdiv (the head-rows' shared row)
    "folds_reversed",  # illm_requant_rows multiplying its folds last to first
    "hadamard_short",  # the Hadamard transform's last butterfly stage left out
    "heads_unaligned", # the heads' requantization ignoring their exponents (no shifts)
    "heads_zero_kept", # its exponent left at NO_EXPONENT for a token whose heads are all zero
    "tk_no_kmin",      # DI-MatMul's output row exponents without the weights' kmin
    "kmin_first_segment",  # a joined DI-MatMul aligning every column to its first layer's kmin
    "ld_dense",        # illm_rope_requant, illm_swiglu and illm_dyadic_rows reading rows n apart, not the row stride ld
    "const_fold_first",  # illm_requant_rows multiplying its constant fold before the per-row ones
})


def i64(v: int, what: str) -> int:
    """An int64 intermediate: an EmulationError if it left the int64 range (the GPU would wrap)."""
    if not -(1 << 63) <= v < (1 << 63):
        raise EmulationError(f"{what}: int64 overflow ({v})")
    return v


# ----------------------------------------------------------------------------- common.cuh divisions


def udiv_u64(n: int, d: int) -> int:
    """qk::udiv_u64: restoring binary long division, one iteration per quotient bit."""
    if d == 0 or n < d:
        return 0
    sh = (64 - d.bit_length()) - (64 - n.bit_length())
    q, r = 0, n
    for i in range(sh, -1, -1):
        ds = (d << i) & MASK64
        q = (q << 1) & MASK64
        if r >= ds:
            r = (r - ds) & MASK64
            q |= 1
    return q


class DivBy:
    """qk::DivBy: ``init`` computes m = ceil(2^s / d) by a 128-bit restoring division whose
    remainder lives in 64 bits (the carry out of its shift kept as a flag); ``div`` takes the high
    word of n * m shifted by s - 64.  ``div`` checks n against the bound given to ``init``."""

    def __init__(self, d: int, nbits: int):
        self.nbits = nbits
        self.one = d <= 1
        l = 0 if self.one else (d - 1).bit_length()  # noqa: E741  64 - __clzll(d - 1)
        s = max(nbits + l, 64)
        self.shift = s - 64
        q = r = 0
        for _ in range(s):  # the s one-bits of the numerator 2^s - 1
            carry = (r >> 63) != 0
            r = ((r << 1) | 1) & MASK64
            q = (q << 1) & MASK64
            if carry or r >= d:
                r = (r - d) & MASK64
                q |= 1
        self.m = (q + 1) & MASK64

    def div(self, n: int) -> int:
        if not 0 <= n < (1 << self.nbits):
            raise EmulationError(f"DivBy: numerator {n} outside the {self.nbits}-bit bound of its init")
        return n if self.one else ((n * self.m) >> 64) >> self.shift  # __umul64hi(n, m) >> shift


# ----------------------------------------------------------------------------- illm:: scalars


class Ops:
    """illm::'s scalar helpers, per launch (the mutations change them)."""

    def __init__(self, mutations):
        self.mutations = mutations

    @staticmethod
    def bitlen(v: int) -> int:
        return v.bit_length() if v > 0 else 0

    def rshift_round(self, v: int, s: int) -> int:
        if s <= 0:
            return v
        half = 0 if "round_down" in self.mutations else 1 << (s - 1)
        return i64(v + half, "rshift_round") >> s

    def shift(self, v: int, s: int) -> int:
        return self.rshift_round(v, s) if s >= 0 else i64(v << (-s), "shift left")

    def normalize(self, m: int, k: int) -> tuple[int, int]:
        if m == 0:
            return 0, 0
        sh = self.bitlen(m) - MANT
        m2 = self.shift(m, sh)
        carry = m2 >> MANT
        return m2 >> carry, k - sh - carry

    def ratio(self, num: int, den: int) -> tuple[int, int]:
        sh = max(MANT + 2 + self.bitlen(den) - self.bitlen(num), 0)
        q = udiv_u64(i64(num << sh, "ratio numerator") & MASK64, den) if den > 0 else 0
        return self.normalize(q, sh)

    def isqrt(self, v: int) -> int:
        if v <= 0:
            return 0
        x = 1 << ((self.bitlen(v) + 1) // 2)
        for _ in range(8):
            x = min(x, i64(x + udiv_u64(v, x), "isqrt") // 2)
        return x - 1 if i64(x * x, "isqrt square") > v else x

    def di_exp2(self, u: int) -> int:
        q = u >> EXP_F
        r = u - (q << EXP_F)
        quad = 0 if "exp_no_square" in self.mutations else self.rshift_round(EXP_B * r, EXP_F)
        p = (1 << EXP_F) + self.rshift_round(i64(r * (EXP_A + quad), "di_exp2"), EXP_F)
        return self.rshift_round(p, min(-q, 62))

    def requant_row(self, vals: list[int], qmax: int, clip: int) -> tuple[list[int], int, int]:
        """illm::requant_row: (q, m, k) of one row (RowQuant<48>)."""
        rq = RowQuant(self, vals, qmax, clip, 32 if "divby_short" in self.mutations else 48)
        return [rq(v) for v in vals], *rq.scale()

    def mul(self, a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        return self.normalize(i64(a[0] * b[0], "dyadic product"), a[1] + b[1])

    def exp_arg(self, negx: int, coef: tuple[int, int], umax: int) -> int:
        s = coef[1] - EXP_F
        v = i64(min(negx, 1 << 40) * coef[0], "DI-Exp argument")
        if s < 0:
            v = min(v, (umax >> min(-s, 40)) + 1)
        return -min(self.shift(v, min(max(s, -40), 62)), umax)

    def silu(self, g: int, coef: tuple[int, int], umax: int) -> int:
        one = 1 << EXP_F
        den = one + self.di_exp2(self.exp_arg(abs(g), coef, umax))
        pos = udiv_u64((one << EXP_F) + den // 2, den)
        neg = "silu_sign" not in self.mutations
        return self.rshift_round(i64(g * (pos if g >= 0 or not neg else one - pos), "silu product"), EXP_F)


class RowQuant:
    """illm::RowQuant<NBITS>: a row's range (``init``), then q of one value and the row's scale."""

    def __init__(self, ops: Ops, vals, qmax: int, clip: int, nbits: int):
        self.ops, self.qmax = ops, qmax
        amax = max((abs(v) for v in vals), default=0)
        self.pre = max(ops.bitlen(amax) - 40, 0)
        amax2 = amax
        if self.pre > 0:
            amax2 = max((abs(ops.rshift_round(v, self.pre)) for v in vals), default=0)
        if "requant_no_clip" not in ops.mutations:
            amax2 = ops.rshift_round(i64(amax2 * clip, "clipped amax"), CLIP_BITS)
        self.amax2 = amax2
        self.by = DivBy(amax2 if amax2 > 0 else 1, nbits)

    def __call__(self, v: int) -> int:
        v = self.ops.rshift_round(v, self.pre)
        mag = self.by.div(i64(min(abs(v), self.amax2) * self.qmax + self.amax2 // 2, "requant numerator"))
        return -mag if v < 0 else mag

    def scale(self) -> tuple[int, int]:
        m, k = self.ops.ratio(self.amax2, self.qmax)
        return m, k - self.pre


# ----------------------------------------------------------------------------- row kernels


def _row(ctx: Ctx, key: str, r: int, n: int, dtype, what: str, ld: int | None = None) -> list[int]:
    """Row r of n values, rows ``ld`` apart (n: dense)."""
    step = n if ld is None or "ld_dense" in ctx.mutations else ld
    return [int(v) for v in _load(ctx, ctx.args[key], r * step + np.arange(n), dtype, what)]


def _store(ctx: Ctx, key: str, index, values, dtype, what: str) -> None:
    info = np.iinfo(dtype)
    if any(not info.min <= v <= info.max for v in values):
        raise EmulationError(f"{what}: a value does not fit {np.dtype(dtype).name} (the kernel's cast would wrap it)")
    data = np.asarray(values, dtype)
    width = data.dtype.itemsize
    ctx.mem.store(ctx.args[key], np.asarray(index, np.int64) * width, data.view(np.uint8).reshape(-1, width), what)


def dyadic_rows(ctx: Ctx, ops: Ops, grid):
    """illm_dyadic_rows: CTA m's threads 0..segments-1 write tk[g, m] = xk[m] + kmin[g]; its strided
    loop t[m, n] = rshift_round(acc[m, n] * wm[n], wk[n] - kmin of n's segment), acc's rows ld apart."""
    a = ctx.args
    M, N = a["M"], a["N"]
    cols = np.arange(N, dtype=np.int64)
    wm = _load(ctx, a["wm"], cols, np.int32, "wm").astype(np.int64)
    shifts = _load(ctx, a["wk"], cols, np.int32, "wk").astype(np.int64) - _illm_kmin(ctx, cols)
    segments = 1 + int(a["n1"] < N) + int(a["n2"] < N)
    for m in range(min(grid[0], M)):
        if a["tk"]:
            xk = int(_load(ctx, a["xk"], [m], np.int64, "xk")[0])
            for g in range(segments):
                kmin = 0 if "tk_no_kmin" in ops.mutations else int(_load(ctx, a["kmin_p"], [g], np.int32, "kmin")[0])
                _store(ctx, "tk", [g * M + m], [i64(xk + kmin, "tk")], np.int64, "tk")
        acc = np.asarray(_row(ctx, "acc", m, N, np.int32, "acc", a["ld"]), np.int64)
        if ops.mutations & {"round_down"}:
            vals = (acc * wm) >> np.maximum(shifts, 0)
        else:
            vals = _rshift_round(acc * wm, shifts)
        _store(ctx, "t", m * N + cols, [int(v) for v in vals], np.int64, "t")


def requant_rows(ctx: Ctx, ops: Ops, grid):
    a = ctx.args
    rows, n = a["rows"], a["n"]
    for r in range(min(grid[0], rows)):
        q, m, k = ops.requant_row(_row(ctx, "v", r, n, np.int64, "v"), a["qmax"], a["clip"])
        const = (int(_load(ctx, a["cm"], [0], np.int64, "cm")[0]), int(_load(ctx, a["ck"], [0], np.int64, "ck")[0])) \
            if a["cm"] else None
        const_first = const is not None and "const_fold_first" in ops.mutations
        if const_first:
            m, k = ops.mul((m, k), const)
        order = range(a["folds"] - 1, -1, -1) if "folds_reversed" in ops.mutations else range(a["folds"])
        for f in order:
            m, k = ops.mul((m, k), (int(_load(ctx, a["fm"], [f * rows + r], np.int64, "fm")[0]),
                                    int(_load(ctx, a["fk"], [f * rows + r], np.int64, "fk")[0])))
        if const is not None and not const_first:
            m, k = ops.mul((m, k), const)
        _store(ctx, "q", r * n + np.arange(n), q, np.int8, "q")
        _store(ctx, "sm", [r], [m], np.int64, "sm")
        _store(ctx, "sk", [r], [k], np.int64, "sk")


def softmax(ctx: Ctx, ops: Ops, grid):
    a = ctx.args
    rows, T, umax = a["rows"], a["T"], a["umax"]
    for r in range(min(grid[0], rows)):
        row = _row(ctx, "scores", r, T, np.int32, "scores")
        L = min(max(int(_load(ctx, a["valid"], [r], np.int32, "valid")[0]), 0), T)
        mx = max(row[:L], default=-(1 << 62))
        sm, sk = _row_scale(ctx, "sm", "sk", r)
        coef = ops.normalize(i64(sm * LOG2E_M, "softmax scale"), sk + LOG2E_K)
        e = [ops.di_exp2(ops.exp_arg(mx - row[j], coef, umax)) for j in range(L)]
        total = i64(sum(e), "softmax total")
        by = DivBy(total if total > 0 else 1, 48)
        out = [by.div(i64((v << PROB_BITS) + total // 2, "softmax numerator")) for v in e] + [0] * (T - L)
        _store(ctx, "P", r * T + np.arange(T), out, np.int32, "P")


def norm_row(ctx: Ctx, ops: Ops, x_key: str, r: int, H: int, qmax: int, clip: int) -> None:
    """illm::norm_row: DI-Norm of row r of ``x_key`` into q, sm, sk (gamma, gk from the launch)."""
    a = ctx.args
    gamma = _row(ctx, "gamma", 0, H, np.int64, "gamma")
    x = _row(ctx, x_key, r, H, np.int64, x_key)
    ss = i64(sum(i64(v * v, "x^2") for v in x), "sum of squares")
    rms = ops.isqrt(udiv_u64(ss, H))
    q, m, k = ops.requant_row([i64(v * g, "x * gamma") for v, g in zip(x, gamma)], qmax, clip)
    im, ik = ops.ratio(m, rms)
    _store(ctx, "q", r * H + np.arange(H), q, np.int8, "q")
    _store(ctx, "sm", [r], [im], np.int64, "sm")
    _store(ctx, "sk", [r], [ik + k + a["gk"]], np.int64, "sk")


def rmsnorm(ctx: Ctx, ops: Ops, grid):
    a = ctx.args
    for r in range(min(grid[0], a["rows"])):
        norm_row(ctx, ops, "x", r, a["H"], a["qmax"], a["clip"])


def _row_scale(ctx: Ctx, mk: str, kk: str, r: int) -> tuple[int, int]:
    return (int(_load(ctx, ctx.args[mk], [r], np.int64, mk)[0]), int(_load(ctx, ctx.args[kk], [r], np.int64, kk)[0]))


def _store_scale(ctx: Ctx, mk: str, kk: str, r: int, d: tuple[int, int]) -> None:
    _store(ctx, mk, [r], [d[0]], np.int64, mk)
    _store(ctx, kk, [r], [d[1]], np.int64, kk)


WIDE_NBITS = 61  # RowQuant<61>: the numerator |v| * qmax + amax2 / 2 < 2^60 for qmax < 2^20


def _written_at(name, mem, ptr: int, at, width: int, what: str) -> None:
    """Every element ``at`` (indices of ``width``-byte elements from ``ptr``) written as many times as
    it is listed there (once, where listed once), and nothing else of the tensor written."""
    w = mem.writes[ptr]
    want = np.zeros(w.shape[0] // width, np.int32)
    np.add.at(want, np.asarray(at, np.int64), 1)
    got = w[: want.shape[0] * width].reshape(-1, width)
    bad = np.flatnonzero((got != want[:, None]).any(axis=1))
    if bad.size:
        raise EmulationError(f"{name}: {what}[{int(bad[0])}] written {int(got[bad[0]].max())} times, "
                             f"{int(want[bad[0]])} expected")


def rope_requant(ctx: Ctx, ops: Ops, grid):
    a = ctx.args
    rows, L, sub, d, groups = a["rows"], a["L"], a["sub"], a["d"], grid[1]
    half = d >> 1
    byd = DivBy(d, 32)
    for r in range(min(grid[0], rows)):
        row = _row(ctx, "t", r, L, np.int64, "t", a["ld"])
        wq = RowQuant(ops, row, WIDE_QMAX, 1 << CLIP_BITS, WIDE_NBITS)
        w = wq.scale()
        if a["fold"] and "wide_no_fold" not in ops.mutations:
            w = ops.mul(w, _row_scale(ctx, "fm", "fk", r))
        if a["rope"]:
            p = int(_load(ctx, a["pos"], [0 if "rope_pos0" in ops.mutations else r], np.int64, "pos")[0])
            c = [int(v) for v in _load(ctx, a["cos"], p * half + np.arange(half), np.int64, "cos")]
            s = [int(v) for v in _load(ctx, a["sin"], p * half + np.arange(half), np.int64, "sin")]
            sign = 1 if "rope_sin_sign" in ops.mutations else -1
        for g in range(groups):
            sr = row[g * sub:(g + 1) * sub]

            def get(i):
                if not a["rope"]:
                    return wq(sr[i])
                j = i - byd.div(i) * d
                if j < half:
                    return ops.rshift_round(i64(wq(sr[i]) * c[j] + sign * wq(sr[i + half]) * s[j], "rope"), ROPE_BITS)
                return ops.rshift_round(i64(wq(sr[i]) * c[j - half] + wq(sr[i - half]) * s[j - half], "rope"), ROPE_BITS)

            vals = [get(i) for i in range(sub)]
            q, m, k = ops.requant_row(vals, a["qmax"], 1 << CLIP_BITS)
            o = ops.mul((m, k), w)
            if a["ofold"]:
                o = ops.mul(o, _row_scale(ctx, "om", "ok", r))
            slot = rope_slot(ctx, r, g, groups)
            _store(ctx, "q", slot * sub + np.arange(sub), q, np.int8, "q")
            _store(ctx, "sm", [slot], [o[0]], np.int64, "sm")
            _store(ctx, "sk", [slot], [o[1]], np.int64, "sk")


def rope_slot(ctx: Ctx, r: int, g: int, groups: int) -> int:
    """Where illm_rope_requant puts sub-row g of row r: (r * groups + g) * stride + col[0] (col[0] = 0
    without a column)."""
    a = ctx.args
    col = int(_load(ctx, a["col"], [0], np.int64, "col")[0]) if a["col"] and "rope_column0" not in ctx.mutations else 0
    if not 0 <= col < a["stride"]:
        raise EmulationError(f"illm_rope_requant: column {col} outside the cache's {a['stride']} (the kernel traps)")
    return (r * groups + g) * a["stride"] + col


def swiglu(ctx: Ctx, ops: Ops, grid):
    a = ctx.args
    rows, n = a["rows"], a["n"]
    for r in range(min(grid[0], rows)):
        g, u = _row(ctx, "tg", r, n, np.int64, "tg", a["ld"]), _row(ctx, "tu", r, n, np.int64, "tu", a["ld"])
        qg = RowQuant(ops, g, a["qmax"], 1 << CLIP_BITS, WIDE_NBITS)
        qu = RowQuant(ops, u, a["qmax"], 1 << CLIP_BITS, WIDE_NBITS)
        sg = qg.scale() if "swiglu_unfolded" in ops.mutations else ops.mul(qg.scale(), _row_scale(ctx, "gm", "gk", r))
        su = ops.mul(qu.scale(), _row_scale(ctx, "um", "uk", r))
        coef = ops.normalize(i64(sg[0] * LOG2E_M, "SiLU scale"), sg[1] + LOG2E_K)
        out = [i64(ops.silu(qg(x), coef, a["umax"]) * qu(y), "SiLU(g) * u") for x, y in zip(g, u)]
        _store(ctx, "a", r * n + np.arange(n), out, np.int64, "a")
        _store_scale(ctx, "sgm", "sgk", r, sg)
        _store_scale(ctx, "sum", "suk", r, su)


def residual_norm(ctx: Ctx, ops: Ops, grid):
    a = ctx.args
    rows, n = a["rows"], a["n"]
    for r in range(min(grid[0], rows)):
        x, b = _row(ctx, "x", r, n, np.int64, "x"), _row(ctx, "b", r, n, np.int64, "b")
        qb = RowQuant(ops, b, a["qmax"], 1 << CLIP_BITS, WIDE_NBITS)
        sx = _row_scale(ctx, "xm", "xk", r)
        sb = ops.mul(qb.scale(), _row_scale(ctx, "bm", "bk", r))
        if "residual_zero_k" in ops.mutations:
            kmin = min(sx[1], sb[1])
        else:
            kmin = sx[1] if sb[0] == 0 else sb[1] if sx[0] == 0 else min(sx[1], sb[1])
        shx, shb = (max(min(k - kmin, 62), -62) for k in (sx[1], sb[1]))
        total = [ops.shift(i64(xv * sx[0], "x * m"), shx) + ops.shift(i64(qb(bv) * sb[0], "b * m"), shb) for xv, bv in zip(x, b)]
        qh = RowQuant(ops, total, a["qmax"], 1 << CLIP_BITS, WIDE_NBITS)
        _store(ctx, "h", r * n + np.arange(n), [qh(v) for v in total], np.int64, "h")
        m, k = qh.scale()
        _store_scale(ctx, "hm", "hk", r, (m, k + kmin))
        # the norm reads back the h just written (the mutation: the residual x instead)
        norm_row(ctx, ops, "x" if "norm_stale_h" in ops.mutations else "h", r, n, a["nqmax"], a["clip"])


def attention(ctx: Ctx, ops: Ops, grid):
    """illm_attention, one CTA (query row r, query head j, head-row hh) at a time."""
    a = ctx.args
    T, group, n, d = a["T"], a["group"], a["n"], a["d"]
    if grid != (T, group, grid[2]) or d % 4 or d > 256:
        raise EmulationError(f"illm_attention: grid {grid} for T={T}, group={group}, or head_dim {d}")
    threads = ROW_THREADS
    groups = threads // d
    for hh in range(grid[2]):
        col = hh * n + np.arange(n)
        k8 = _load(ctx, a["k8"], (col[:, None] * d + np.arange(d)).reshape(-1), np.int8, "k8").reshape(n, d).astype(np.int64)
        v8 = _load(ctx, a["v8"], (col[:, None] * d + np.arange(d)).reshape(-1), np.int8, "v8").reshape(n, d).astype(np.int64)
        km, kk, vm, vk = ([int(x) for x in _load(ctx, a[key], col, np.int64, key)] for key in ("km", "kk", "vm", "vk"))
        for j in range(group):
            for r in range(T):
                row = (hh * group + j) * T + r
                q = _load(ctx, a["q"], row * d + np.arange(d), np.int8, "q").astype(np.int64)
                mrow = _load(ctx, a["mask"], ((hh if a["mask_hr"] else 0) * T + r) * n + np.arange(n), np.uint8, "mask")
                seen = [c for c in range(n) if mrow[c]]
                live = seen if "attn_unmasked" not in ops.mutations else range(n)
                ek = min((kk[c] for c in live if km[c] > 0), default=NO_EXPONENT)
                ev = min((vk[c] for c in seen if vm[c] > 0), default=NO_EXPONENT)
                ek, ev = (0 if x == NO_EXPONENT else x for x in (ek, ev))

                # the scratch's slots of this row (the kernel's prow + c), written by passes 1 to 4
                base = 0 if "attn_scratch_shared" in ops.mutations else row * n

                def through(cols, vals):  # stored to the row's slots, then read back as the next pass reads them
                    at = base + np.asarray(cols, np.int64)
                    _store(ctx, "ps", at, vals, np.int64, "ps")
                    return dict(zip(cols, (int(v) for v in _load(ctx, a["ps"], at, np.int64, "ps"))))

                def score(c):
                    acc = int(q @ k8[c])  # __dp4a: int8 products summed in int32 (at most d 2^14)
                    sh = min(max(kk[c] - ek, 0), 62) if km[c] > 0 else 0
                    return ops.rshift_round(i64(acc * km[c], "q.k * m"), sh)

                scores = through(seen, [score(c) for c in seen])  # pass 1
                in_max = [c for c in seen if km[c] > 0] if "attn_max_live" in ops.mutations else seen
                mx = max((scores[c] for c in in_max), default=-(1 << 62))
                qrow = (hh if "attn_qrow_hh" in ops.mutations else hh // a["qdiv"]) * T + r  # udiv_u32(hh, qdiv)
                hw = int(_load(ctx, a["qk"], [qrow], np.int64, "qk")[0])
                scale = ops.normalize(i64(int(_load(ctx, a["qm"], [qrow], np.int64, "qm")[0]) * a["sdm"], "q scale"),
                                      hw + ek + a["sdk"])
                coef = ops.normalize(i64(scale[0] * LOG2E_M, "softmax scale"), scale[1] + LOG2E_K)
                ex = through(seen, [ops.di_exp2(ops.exp_arg(mx - scores[c], coef, a["umax"])) for c in seen])  # pass 2
                total = i64(sum(ex.values()), "softmax total")
                by = DivBy(total if total > 0 else 1, 48)

                def pv(c):
                    if c not in ex:
                        return 0
                    p = by.div(i64((ex[c] << PROB_BITS) + total // 2, "softmax numerator"))
                    sh = min(max(vk[c] - ev, 0), 62) if vm[c] > 0 else 0
                    return ops.rshift_round(i64(p * vm[c], "p * m"), sh)

                cols = list(range(n))
                vals = through(cols, [pv(c) for c in cols])  # pass 3
                rq = RowQuant(ops, [vals[c] for c in cols], WIDE_QMAX, 1 << CLIP_BITS, WIDE_NBITS)
                pq = through(cols, [rq(vals[c]) for c in cols])  # pass 4, read by P V after the barrier
                # P V by column groups (thread g of a dimension takes columns g, g + groups, ...)
                parts = [sum(pq[c] * int(v8[c, dd]) for c in range(g, n, groups)) for g in range(groups) for dd in range(d)]
                kept = 1 if "attn_pv_group0" in ops.mutations else groups
                m, k = rq.scale()
                out = [i64(sum(parts[g * d + dd] for g in range(kept)) * m, "P V * m") for dd in range(d)]
                _store(ctx, "o", row * d + np.arange(d), out, np.int64, "o")
                _store(ctx, "e", [row], [k + ev if m > 0 else NO_EXPONENT], np.int64, "e")


def attention_scratch_writes(ctx: Ctx, grid) -> np.ndarray:
    """The writes illm_attention's scratch must get, each slot listed once per write: every row's
    seen columns four times (score, exponential, P, P requantized), its unseen ones twice (P = 0, its
    requantization)."""
    a = ctx.args
    T, group, n = a["T"], a["group"], a["n"]
    out = []
    for hh in range(grid[2]):
        for r in range(T):
            seen = _load(ctx, a["mask"], ((hh if a["mask_hr"] else 0) * T + r) * n + np.arange(n), np.uint8, "mask") != 0
            times = np.where(seen, 4, 2)
            for j in range(group):
                out.append(np.repeat(((hh * group + j) * T + r) * n + np.arange(n), times))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def hadamard(ctx: Ctx, ops: Ops, grid):
    """illm_hadamard: the butterflies in place in t with the kernel's pair indices, then A's
    combination into y (t itself when m = 1); every sum checked against int64."""
    a = ctx.args
    rows, m, lp = a["rows"], a["m"], a["lp"]
    p, n = 1 << lp, a["m"] << a["lp"]
    if (m == 1) != (a["t"] == a["y"]):
        raise EmulationError("illm_hadamard: y must be t exactly when m = 1")
    sign = _load(ctx, a["sign"], np.arange(m * m), np.int8, "sign").astype(np.int64).reshape(m, m)
    half = p >> 1
    stages = lp - 1 if "hadamard_short" in ops.mutations else lp
    for r in range(min(grid[0], rows)):
        t = [int(v) for v in _load(ctx, a["x"], r * n + np.arange(n), np.int64, "x")]
        for s in range(stages):
            h = 1 << s
            for q in range(m * half):
                aa, b = q >> (lp - 1), q & (half - 1)
                i = aa * p + (((b >> s) << (s + 1)) | (b & (h - 1)))
                u, v = t[i], t[i + h]
                t[i], t[i + h] = i64(u + v, "butterfly sum"), i64(u - v, "butterfly difference")
        if m == 1:
            _store(ctx, "t", r * n + np.arange(n), t, np.int64, "t")
            continue
        ctx.mem.store(a["t"], (r * n + np.arange(n)) * 8, np.asarray(t, np.int64).view(np.uint8).reshape(-1, 8), "t")
        out = [i64(sum(t[k * p + (o & (p - 1))] if sign[k, o >> lp] > 0 else -t[k * p + (o & (p - 1))] for k in range(m)),
                   "A's combination") for o in range(n)]
        _store(ctx, "y", r * n + np.arange(n), out, np.int64, "y")


def heads_requant(ctx: Ctx, ops: Ops, grid):
    a = ctx.args
    rows, heads, T, d = a["rows"], a["heads"], a["t"], a["d"]
    n = heads * d
    byd = DivBy(d, 32)
    for tok in range(min(grid[0], rows * T)):
        b = udiv_u64(tok, T)
        j = tok - b * T
        e = [int(_load(ctx, a["e"], [(b * heads + h) * T + j], np.int64, "e")[0]) for h in range(heads)]
        lo = min(e)
        if lo == NO_EXPONENT and "heads_zero_kept" not in ops.mutations:
            lo = 0
        vals = []
        for i in range(n):
            h = byd.div(i)
            v = int(_load(ctx, a["o"], [((b * heads + h) * T + j) * d + i - h * d], np.int64, "o")[0])
            s = 0 if "heads_unaligned" in ops.mutations else min(max(e[h] - lo, 0), 62)
            vals.append(ops.rshift_round(v, s))
        q, m, k = ops.requant_row(vals, a["qmax"], a["clip"])
        _store(ctx, "q", tok * n + np.arange(n), q, np.int8, "q")
        _store_scale(ctx, "sm", "sk", tok, (m, i64(k + lo + PROB_BITS, "heads' exponent")))


class Emulator(_Bytes64):
    """The launch hook of illm_gemm.cu: the row kernels here, DI-MatMul (and QUIK's kernels) by
    quik/emulate.py's main loops."""

    KERNELS = _Bytes64.KERNELS + (("illm_dyadic_rows", DYADIC_PARAMS, ROW_THREADS),
                                  ("illm_requant_rows", REQUANT_PARAMS, ROW_THREADS),
                                  ("illm_softmax", SOFTMAX_PARAMS, ROW_THREADS),
                                  ("illm_rmsnorm", RMSNORM_PARAMS, ROW_THREADS),
                                  ("illm_rope_requant", ROPE_PARAMS, ROW_THREADS),
                                  ("illm_swiglu", SWIGLU_PARAMS, ROW_THREADS),
                                  ("illm_residual_norm", RESIDUAL_PARAMS, ROW_THREADS),
                                  ("illm_attention", ATTENTION_PARAMS, ROW_THREADS),
                                  ("illm_hadamard", HADAMARD_PARAMS, ROW_THREADS),
                                  ("illm_heads_requant", HEADS_PARAMS, ROW_THREADS))
    KNOWN = MUTATIONS

    def run(self, name, grid, ctx):
        rows = {"illm_requant_rows": (requant_rows, (("q", "n", 1), ("sm", None, 8), ("sk", None, 8))),
                "illm_softmax": (softmax, (("P", "T", 4),)),
                "illm_rmsnorm": (rmsnorm, (("q", "H", 1), ("sm", None, 8), ("sk", None, 8))),
                "illm_swiglu": (swiglu, (("a", "n", 8), ("sgm", None, 8), ("sgk", None, 8), ("sum", None, 8),
                                         ("suk", None, 8))),
                "illm_residual_norm": (residual_norm, (("h", "n", 8), ("hm", None, 8), ("hk", None, 8), ("q", "n", 1),
                                                       ("sm", None, 8), ("sk", None, 8)))}
        if name == "illm_dyadic_rows":
            a = ctx.args
            if grid[0] != a["M"] or not (0 < a["n1"] <= a["n2"] <= a["N"] <= a["ld"]):
                raise EmulationError(f"{name}: grid {grid} for M={a['M']} rows, or bounds n1={a['n1']}, n2={a['n2']}, "
                                     f"N={a['N']}, ld={a['ld']}")
            for key in ("t", "tk"):
                if a[key]:
                    ctx.mem.track(a[key])
            dyadic_rows(ctx, Ops(ctx.mutations), grid)
            _written_once(name, ctx.mem, a["t"], a["M"] * a["N"], 8, "t")
            if a["tk"]:
                _written_once(name, ctx.mem, a["tk"], a["M"] * (1 + int(a["n1"] < a["N"]) + int(a["n2"] < a["N"])), 8, "tk")
            return
        if name == "illm_attention":
            a = ctx.args
            count = grid[2] * a["group"] * a["T"]
            for key in ("ps", "o", "e"):
                ctx.mem.track(a[key])
            attention(ctx, Ops(ctx.mutations), grid)
            for key, per, width in (("o", a["d"], 8), ("e", 1, 8)):
                _written_once(name, ctx.mem, a[key], count * per, width, key)
            _written_at(name, ctx.mem, a["ps"], attention_scratch_writes(ctx, grid), 8, "ps")
            return
        for key in {"illm_rope_requant": ("t",), "illm_swiglu": ("tg", "tu")}.get(name, ()):
            ctx.mem.allow_rows(ctx.args[key])  # read with the row stride ld
        if name == "illm_rope_requant":
            a = ctx.args
            if grid[0] != a["rows"] or grid[1] * a["sub"] != a["L"]:
                raise EmulationError(f"{name}: grid {grid} for {a['rows']} rows of {a['L'] // a['sub']} groups")
            for key in ("q", "sm", "sk"):
                ctx.mem.track(a[key])
            rope_requant(ctx, Ops(ctx.mutations), grid)
            slots = np.array([rope_slot(ctx, r, g, grid[1]) for r in range(a["rows"]) for g in range(grid[1])], np.int64)
            cells = (slots[:, None] * a["sub"] + np.arange(a["sub"])).reshape(-1)
            for key, at, width in (("q", cells, 1), ("sm", slots, 8), ("sk", slots, 8)):
                _written_at(name, ctx.mem, a[key], at, width, key)
            return
        if name == "illm_heads_requant":
            a = ctx.args
            tokens = a["rows"] * a["t"]
            if grid[0] != tokens:
                raise EmulationError(f"{name}: grid {grid} for {tokens} tokens")
            for key in ("q", "sm", "sk"):
                ctx.mem.track(a[key])
            heads_requant(ctx, Ops(ctx.mutations), grid)
            for key, count, width in (("q", tokens * a["heads"] * a["d"], 1), ("sm", tokens, 8), ("sk", tokens, 8)):
                _written_once(name, ctx.mem, a[key], count, width, key)
            return
        if name == "illm_hadamard":
            a = ctx.args
            out = "t" if a["m"] == 1 else "y"
            ctx.mem.track(a[out])
            hadamard(ctx, Ops(ctx.mutations), grid)
            _written_once(name, ctx.mem, a[out], a["rows"] * (a["m"] << a["lp"]), 8, out)
            return
        if name not in rows:
            return super().run(name, grid, ctx)
        fn, outs = rows[name]
        if grid[0] != ctx.args["rows"]:
            raise EmulationError(f"{name}: grid {grid} for {ctx.args['rows']} rows")
        for key, _, _ in outs:
            ctx.mem.track(ctx.args[key])
        fn(ctx, Ops(ctx.mutations), grid)
        for key, per_row, width in outs:
            count = ctx.args["rows"] * (ctx.args[per_row] if per_row else 1)
            _written_once(name, ctx.mem, ctx.args[key], count, width, key)


def emulating(**kwargs):
    """Run the I-LLM launchers (row kernels and DI-MatMul) on the CPU emulator; yields the ``Emulator``."""
    return Emulator.hooked(**kwargs)
