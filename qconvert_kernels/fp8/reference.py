"""Torch reference of the ZeroQuant-FP kernels (qconvert_kernels/fp8/fp8_gemm.cu): FP8 E4M3
activations times FP4 E2M1 (layout ``fp4-fp8``) or FP8 E4M3 (layout ``fp8-fp8``) weights.

Number formats (no infinities in either; both round to nearest, ties to even):

    E4M3 (torch.float8_e4m3fn): s eeee mmm, bias 7, max 448, subnormals m * 2^-9, 0x7F / 0xFF NaN
    E2M1 (FP4):                 s ee m,     bias 1, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
                                (code c & 7 -> E2M1_VALUES[c & 7], bit 3 the sign)

Every E2M1 value is an E4M3 value: code s e1 e0 m with e = e1 e0 >= 1 widens to the E4M3 byte
s (e + 6) m 0 0 (the exponent re-biased from 1 to 7), 0.5 (e = 0, m = 1) to s 0110 000, and 0
to 0 (``e2m1_to_e4m3_bits``: the kernel does exactly this in registers).

Activations (``quantize_per_token_fp8``), per token m, in float32:
    amax = max_k |x[m, k]|,  t[m] = amax / 448 (one division),  inv = (1 / amax) * 448 (two
    roundings, as torch's ``448 / tensor``),  xq[m, k] = e4m3(clamp(x[m, k] * inv, -448, 448)).
    The clamp is a no-op for finite x (|x * inv| <= 448 (1 + 2^-22) rounds to 448) and keeps
    the result independent of how a float -> e4m3 conversion treats overflow (torch 2.13
    saturates; the kernel's cvt.rn.satfinite saturates).  An all-zero row: t = 0, xq = 0.

fp4-fp8 (``fp4_fp8_gemm``), with E2M1 weight values w [N, Kp], group exponents e [N, G] and
per-channel float32 scales c [N] (W[n, k] ~= w[n, k] * 2^e[n, k // g] * c[n]):
    P[j, m, n] = sum_{k in group j} xq[m, k] * w[n, k]       exact, then rounded once to float32
    acc = 0;  for j = 0..G-1:  acc = fl(acc + P[j, m, n] * 2^e[n, j])    (the product is exact)
    y[m, n] = fl(acc * fl(t[m] * c[n]))

fp8-fp8 (``fp8_fp8_gemm``), E4M3 weights wq [N, Kp] with per-channel float32 scales s [N],
Kp a multiple of FP8_CHUNK = 64, accumulated chunk by chunk like a group of fp4-fp8:
    P[c, m, n] = sum_{k in chunk c} xq[m, k] * wq[n, k]      exact, then rounded once to float32
    acc = 0;  for c = 0..Kp/64-1:  acc = fl(acc + P[c])
    y[m, n] = fl(acc * fl(t[m] * s[n]))
(the kernel moves the tensor cores' accumulator into a float32 sum every 64 k rather than
letting it run over all of K: the unspecified accumulation stays inside 64 products.)

Exactness.  Every product of two E4M3 numbers (or E4M3 x E2M1) is exact in float32 (at most
8 significant bits, exponents 2^-18 .. 2^18), and the sums here are computed exactly in float64
(all terms are multiples of 2^-18 below 2^36 in those units: exact for K < 2^17) and rounded
once.  The tensor cores accumulate a group's products in their own float32-like accumulator,
whose internal alignment and rounding PTX leaves unspecified, so the kernel's P can differ from
this exact P in its last bits: the GPU tests accept |y_gpu - y_ref| <= 2^-9 * |y|_abs + 1 ulp
of the output type, |y|_abs = fl(t c) * sum_j 2^e sum_k |xq w| (the sum of absolute products).
A wrong fragment layout or exponent shift breaks that by orders of magnitude.  Everything after
P (the group / chunk sums, the power-of-two fold, the scale products) is float32 in the same
order on both sides.

LoRC (``lorc_term``): z = ((xq * t) Vᵀ) Uᵀ in float32 with U fp16 [N, r], V fp16 [r, K]: the
low-rank correction reads the same FP8 activations as the main GEMM.  y_total = y + z.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP8_CHUNK = 64  # fp8-fp8: k per exactly summed chunk (one shared-memory stage of the kernel)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code & 7 -> magnitude
E2M1_MAX = 6.0


def e2m1_codebook() -> torch.Tensor:
    """float32 [16]: code -> value (codes 8..15 negative; code 8 is -0)."""
    v = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return torch.cat([v, -v])


def e2m1_to_e4m3_bits(codes: torch.Tensor) -> torch.Tensor:
    """The kernel's widening, uint8 E2M1 codes (0..15) -> uint8 E4M3 bytes of the same value."""
    c = codes.to(torch.int32)
    sign, e, m = (c >> 3) & 1, (c >> 1) & 3, c & 1
    normal = (e + 6) << 3 | (m << 2)          # e >= 1: exponent re-biased 1 -> 7, mantissa m00
    sub = torch.where(m == 1, torch.full_like(c, 6 << 3), torch.zeros_like(c))  # 0.5 = 2^-1, or 0
    mag = torch.where(e > 0, normal, sub)
    return (sign << 7 | mag).to(torch.uint8)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float -> float8_e4m3fn, round to nearest even, saturating at +-448."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_per_token_fp8(x: torch.Tensor, kp: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token E4M3: (xq float8_e4m3fn [M, Kp], t float32 [M]); see the module doc."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    inv = torch.where(amax > 0, amax.reciprocal() * FP8_MAX, torch.zeros_like(amax))
    xq = to_e4m3(x * inv[:, None])
    if kp is not None and kp > xq.shape[-1]:
        xq = torch.nn.functional.pad(xq.view(torch.uint8), (0, kp - xq.shape[-1])).view(torch.float8_e4m3fn)
    return xq, amax / FP8_MAX


def weight_groups(w_values: torch.Tensor, group_size: int) -> torch.Tensor:
    """float [N, Kp] weight values -> float64 [G, g, N], the layout ``fp4_fp8_gemm`` multiplies by."""
    n, kp = w_values.shape
    return w_values.double().reshape(n, kp // group_size, group_size).permute(1, 2, 0).contiguous()


def fp4_fp8_partials(xq: torch.Tensor, w_groups: torch.Tensor) -> torch.Tensor:
    """P float32 [G, M, N]: each group's (chunk's) exact sum of products, rounded once."""
    g_count, g, _ = w_groups.shape
    m = xq.shape[0]
    assert xq.shape[1] == g_count * g, (xq.shape, w_groups.shape)
    xg = xq.double().reshape(m, g_count, g).transpose(0, 1)  # [G, M, g]
    return torch.bmm(xg, w_groups).float()


def fp4_fp8_gemm(xq, t, w_groups, sexp, cscale) -> torch.Tensor:
    """y float32 [M, N] of layout fp4-fp8; ``w_groups`` from ``weight_groups`` (E2M1 values),
    ``sexp`` int [N, G] group exponents, ``cscale`` float32 [N]: every group folded in order (one
    split of ``fp4_fp8_gemm_split``)."""
    return fp4_fp8_gemm_split(xq, t, w_groups, sexp, cscale, [(0, w_groups.shape[0])])


def fp4_fp8_gemm_split(xq, t, w_groups, sexp, cscale, bounds) -> torch.Tensor:
    """``fp4_fp8_gemm`` in the order of a split-K launch of the repacked decode kernel
    (w4a8_repacked.cu, KIND_ZQ): each split (g0, g1) of ``bounds`` folds its groups in order from
    0.0, the splits' sums are added in split order, then times t[m] * c[n].  With one split this is
    ``fp4_fp8_gemm`` exactly."""
    p = fp4_fp8_partials(xq, w_groups)  # [G, M, N]
    pow2 = torch.ldexp(torch.ones(sexp.t().shape, dtype=torch.float32), sexp.to(torch.int32).t())
    total = None
    for g0, g1 in bounds:
        acc = torch.zeros(p.shape[1:], dtype=torch.float32)
        for j in range(g0, g1):
            acc += p[j] * pow2[j][None, :]
        total = acc if total is None else total + acc
    return total * (t.float()[:, None] * cscale.float()[None, :])


def fp4_fp8_gemm_widened(xq, t, w_groups, sexp, cscale) -> torch.Tensor:
    """The prefill's FP8 GEMM (w4a8/cuda.py: zq_prefill): the same products as ``fp4_fp8_gemm``
    (xq[m, k] * w[n, k] * 2^e[n, k // g]), summed over all of K in float64 (exact for the exponent
    spans the prefill accepts, at most 14) and rounded once, then times t[m] * c[n].  The GPU's GEMM
    sums in its own order: its tests hold it to this module's tolerance."""
    g_count, g, n = w_groups.shape
    pow2 = torch.ldexp(torch.ones(n, g_count, dtype=torch.float64), sexp.to(torch.float64))  # [N, G]
    w = (w_groups.permute(2, 0, 1) * pow2[:, :, None]).reshape(n, g_count * g)           # [N, Kp], exact
    acc = (xq.double() @ w.t()).float()
    return acc * (t.float()[:, None] * cscale.float()[None, :])


def fp8_fp8_gemm(xq, t, wq, wscale) -> torch.Tensor:
    """y float32 [M, N] of layout fp8-fp8: wq float8_e4m3fn [N, Kp] (Kp % 64 == 0), ``wscale`` float32 [N]."""
    assert wq.shape[1] % FP8_CHUNK == 0 and xq.shape[1] == wq.shape[1], (xq.shape, wq.shape)
    p = fp4_fp8_partials(xq, weight_groups(wq.double(), FP8_CHUNK))  # [C, M, N], exact per chunk
    acc = torch.zeros(p.shape[1:], dtype=torch.float32)
    for c in range(p.shape[0]):
        acc += p[c]
    return acc * (t.float()[:, None] * wscale.float()[None, :])


LORC_THREADS = 256  # fp8_repacked.cu's w4a8r_lorc_h_zq: threads per token


def lorc_h_lanes(xq, t, v) -> torch.Tensor:
    """h float32 [M, R] = (xq * t) Vᵀ in the order of the decode path's kernel (w4a8r_lorc_h_zq):
    xd = fl(float(xq) * t); thread i < 256 sums k = i, i + 256, ... in order (fl(fl(xd v) + .)); a
    warp's 32 lanes meet in an xor butterfly (offsets 16 .. 1), then the 8 warp sums in warp order."""
    k = v.shape[1]
    m, r = xq.shape[0], v.shape[0]
    xd = (xq[:, :k].float() * t.float()[:, None])                     # [M, K], each product rounded
    vf = v.float()
    steps = -(-k // LORC_THREADS)
    pad = steps * LORC_THREADS - k
    xd = torch.nn.functional.pad(xd, (0, pad)).reshape(m, steps, LORC_THREADS)
    vf = torch.nn.functional.pad(vf, (0, pad)).reshape(r, steps, LORC_THREADS)
    part = torch.zeros(m, LORC_THREADS, r)
    for j in range(steps):  # padding adds exact zeros
        part = part + xd[:, j, :, None] * vf[:, j, :].t()[None]
    lanes = part.reshape(m, 8, 32, r)
    for o in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[:, :, torch.arange(32) ^ o]
    warps = lanes[:, :, 0]                                             # [M, 8, R]
    h = warps[:, 0]
    for w in range(1, 8):
        h = h + warps[:, w]
    return h


def lorc_tail(y, h, u) -> torch.Tensor:
    """The decode kernel's epilogue with LoRC: fl(y + z), z = sum_r fl(h[m, r] u[n, r]) added in r order
    from 0.0 (w4r::lorc_tail); y float32 [M, N] before its rounding to fp16 / bf16."""
    z = torch.zeros_like(y)
    uf = u.float()
    for r in range(h.shape[1]):
        z = z + h[:, r, None] * uf[None, :, r]
    return y + z


def lorc_term(xq, t, u, v) -> torch.Tensor:
    """z float32 [M, N] = ((xq * t) Vᵀ) Uᵀ, V fp16 [r, K] (K <= Kp), U fp16 [N, r]."""
    k = v.shape[1]
    xd = xq[:, :k].float() * t.float()[:, None]
    return (xd @ v.float().t()) @ u.float().t()
