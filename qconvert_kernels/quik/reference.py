"""Bit-exact torch reference of the QUIK kernels (layouts ``quik-w4a4`` and ``quik-w8a8``).

QUIK (Ashkboos et al., 2023) keeps a few input channels of a linear, those whose activations
have outliers, in fp16 and runs the rest with b-bit integers (b = 4 or 8):

    x [M, K] = x_base [M, Kb] (the channels not in ``outlier_idx``, in channel order)
             + x_out  [M, n]  (the channels in ``outlier_idx``, in the stored order)

Activations, per token, asymmetric, over the base channels only (``quantize_split``):
    lo = min_k x_base[m, k] * c, hi = max_k x_base[m, k] * c      (float32; c = ``clip``)
    r  = hi - lo;   s = r / L;   inv = (1 / r) * L   (0 when r == 0)      L = 2^b - 1
    u  = clamp(rint((x - lo) * inv), 0, L)           (x - lo rounded first, then the product)
    xq = u - 2^(b-1)                                  signed: int4 [-8, 7] or int8 [-128, 127]
    z  = lo + 2^(b-1) * s                             x ~= s * xq + z
c (0 < c <= 1, rounded to float32 first) shrinks the token's range so the 2^b levels sit closer
together, and the few values beyond it saturate (QuaRot's activation clipping); c = 1 is exact.
Columns Kb..Kbp-1 of xq (padding to the kernel's k tile, 64) are 0.

Weights: q int [N, Kbp] symmetric per output channel with float32 scale ws [N] (base channels,
padding columns 0), R[n] = sum_k q[n, k] (int32, ``wsum``), and the fp16 outlier columns
W_out [N, n].  The GEMM (``quik_gemm``):
    acc[m, n] = sum_k xq[m, k] * q[n, k]                                    int32, exact
    y[m, n]   = ((float(acc) * (s[m] * ws[n])) + (z[m] * (ws[n] * float(R[n])))) + y_out[m, n]
every product and sum rounded to float32 in this order (the CUDA kernel writes each with
__fmul_rn / __fadd_rn), where y_out = x_out W_outᵀ is the outlier product: on CPU a float32
matmul (``outlier_product``), on the GPU cuBLAS fp16; the kernel's epilogue adds whichever it
is handed, so the GPU tests hand the reference the same y_out.
"""

from __future__ import annotations

import struct

import torch

K_TILE = 64  # the base part is padded to this many columns: the int4 mma's K


def levels(bits: int) -> int:
    return (1 << bits) - 1


def split_columns(k: int, outlier_idx: torch.Tensor) -> torch.Tensor:
    """The base channel indices (int64 [K - n], ascending): every channel not an outlier."""
    keep = torch.ones(k, dtype=torch.bool)
    keep[outlier_idx.long()] = False
    return torch.nonzero(keep).flatten()


def padded_base(kb: int) -> int:
    return -(-kb // K_TILE) * K_TILE


def clip32(clip: float) -> float:
    """The activation clip as every implementation uses it: rounded to float32, in (0, 1]."""
    try:
        c = struct.unpack("f", struct.pack("f", float(clip)))[0]
    except OverflowError:  # beyond float32's range
        c = float("inf")
    if not 0.0 < c <= 1.0:
        raise ValueError(f"activation clip {clip!r} must be in (0, 1] once rounded to float32")
    return c


def valid_clip(clip) -> bool:
    """A number (not a bool) that ``clip32`` takes."""
    if isinstance(clip, bool) or not isinstance(clip, (int, float)):
        return False
    try:
        return bool(clip32(clip))
    except ValueError:
        return False


def quantize_split(x: torch.Tensor, base_idx: torch.Tensor, outlier_idx: torch.Tensor, bits: int,
                   clip: float = 1.0):
    """x float [M, K] -> (xq int8 [M, Kbp] with values in [-2^(b-1), 2^(b-1)-1], s float32 [M],
    z float32 [M], x_out [M, n] in x's dtype); see the module docstring."""
    xf = x.float()
    xb = xf.index_select(1, base_idx)
    c = clip32(clip)
    lo = xb.amin(dim=1) * c
    hi = xb.amax(dim=1) * c
    r = hi - lo
    lv = levels(bits)
    inv = torch.where(r > 0, r.reciprocal() * lv, torch.zeros_like(r))
    u = torch.clamp(torch.round((xb - lo[:, None]) * inv[:, None]), 0, lv)
    half = 1 << (bits - 1)
    xq = (u - half).to(torch.int8)
    kb = xq.shape[1]
    if padded_base(kb) > kb:
        xq = torch.nn.functional.pad(xq, (0, padded_base(kb) - kb))
    s = r / lv
    z = lo + s * half  # exact product: half is a power of two
    return xq, s, z, x.index_select(1, outlier_idx.long())


def dequantize_split(x: torch.Tensor, outlier_mask: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """What the layer computes with, as a float tensor like x: base channels s * xq + z, the
    outlier channels (``outlier_mask`` bool [K]) unchanged; calibration runs the next layers
    through this.  The same float32 operations as ``quantize_split``, elementwise over all
    channels with the outliers masked out of min / max (no gathers: it runs on every
    calibration batch)."""
    xf = x.float()
    c = clip32(clip)
    lo = torch.where(outlier_mask, torch.inf, xf).amin(dim=-1, keepdim=True) * c
    hi = torch.where(outlier_mask, -torch.inf, xf).amax(dim=-1, keepdim=True) * c
    r = hi - lo
    lv = levels(bits)
    half = 1 << (bits - 1)
    inv = torch.where(r > 0, r.reciprocal() * lv, torch.zeros_like(r))
    xq = torch.clamp(torch.round((xf - lo) * inv), 0, lv) - half
    s = r / lv
    z = lo + s * half
    return torch.where(outlier_mask, xf, xq * s + z).to(x.dtype)


def outlier_product(x_out: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """y_out float32 [M, N] = x_out W_outᵀ (float32 matmul; zeros when there are no outliers)."""
    return x_out.float() @ w_out.float().t()


def outlier_product_lanes(x_out: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """y_out [M, N] in x_out's dtype as the split's fused product makes it (quik_gemm.cu,
    quik::outlier_columns): lane l (of 32) sums x_out[m, k] * w_out[n, k] over k = l, l + 32, ...
    in that order, each product and sum rounded to float32 (as the kernel's __fmul_rn, __fadd_rn),
    the 32 lane sums are added by the xor butterfly (offsets 16, 8, 4, 2, 1), and the total is
    rounded once to x_out's dtype."""
    m, n_out = x_out.shape
    lanes = -(-n_out // 32) * 32
    x = torch.nn.functional.pad(x_out.float(), (0, lanes - n_out))       # zero products add nothing:
    w = torch.nn.functional.pad(w_out.float(), (0, lanes - n_out))       # a lane sum is never -0
    acc = torch.zeros((m, w.shape[0], 32), dtype=torch.float32)
    for s0 in range(0, lanes, 32):
        acc = acc + x[:, None, s0:s0 + 32] * w[None, :, s0:s0 + 32]
    lane = torch.arange(32)
    for o in (16, 8, 4, 2, 1):
        acc = acc + acc[:, :, lane ^ o]
    return acc[:, :, 0].to(x_out.dtype)


def _absmax(t: torch.Tensor) -> int:
    return int(t.to(torch.int64).abs().max()) if t.numel() else 0


def quik_gemm(xq: torch.Tensor, s: torch.Tensor, z: torch.Tensor, q: torch.Tensor, wscale: torch.Tensor,
              wsum: torch.Tensor, y_out: torch.Tensor, return_acc: bool = False):
    """y float32 [M, N]; q int8 [N, Kbp] (unpacked), y_out float32 [M, N]; see the module docstring.

    The int32 sum is computed with a float matmul that is exact: float32 when every partial
    sum is an integer below 2^24 (max|xq| * max|q| * K < 2^24: always for int4), else float64
    (below 2^53); it is checked to fit int32 (it always does for K < 2^17)."""
    exact32 = _absmax(xq) * _absmax(q) * xq.shape[1] < 2**24
    dt = torch.float32 if exact32 else torch.float64
    acc = (xq.to(dt) @ q.to(dt).t()).to(torch.int64)
    assert _absmax(acc) < 2**31, "int32 accumulator overflow"
    acc = acc.to(torch.int32)
    ws = wscale.float()
    a = acc.float() * (s.float()[:, None] * ws[None, :])
    b = z.float()[:, None] * (ws * wsum.float())[None, :]
    y = (a + b) + y_out.float()
    return (y, acc) if return_acc else y
