"""Bit-exact torch references of the W4A8 kernels (integer scale and float scale).

Notation (docs/format.md and ARCHITECTURE.md use the same):
    x  : activations [M, K] (any float dtype; computed in float32)
    xq : int8 [M, Kp], per-token symmetric, values in [-127, 127]; Kp = K padded to g
    t  : float32 [M], the per-token scale, x ~= t[m] * xq[m, k]
    q  : int8 [N, Kp], int4 weights in [-8, 7]; padded columns are 0
    P  : int32 [G, M, N], P[j, m, n] = sum over k in group j of xq[m, k] * q[n, k]

Integer scale (``w4a8_is_gemm``):
    A[m, n] = sum_j iscale[n, j] * P[j, m, n]          int32, summed in order j = 0..G-1
    y[m, n] = float32(A[m, n]) * (t[m] * cscale_a[n])    cscale_a = cscale / 2**alpha_log2
Float scale (``w4a8_fs_gemm``, the paper's counterpart):
    y[m, n] = t[m] * sum_j float32(scales[n, j]) * float32(P[j, m, n])

The converter proves |A| <= 2**31 - 1 for any int8 input (see
``qconvert.methods.integer_scale.overflow_bound``), so int32 never wraps here or in a kernel.
"""

from __future__ import annotations

import torch

ACT_QMAX = 127  # symmetric int8: -128 is never produced


def quantize_per_token_int8(x: torch.Tensor, kp: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8: returns (xq int8 [M, Kp], t float32 [M]).

    amax = max_k |x[m, k]|;  t = amax / 127 (one division);
    inv = (1 / amax) * 127 (a reciprocal, then a product: two float32 roundings, which is what
    torch computes for ``127 / tensor``; the CUDA quantizer uses __frcp_rn then __fmul_rn);
    xq = clamp(rint(x * inv), -127, 127).
    An all-zero row gets t = 0 and xq = 0.  Columns K..Kp-1 are zero padding.
    """
    x = x.float()
    amax = x.abs().amax(dim=-1)
    inv = torch.where(amax > 0, amax.reciprocal() * ACT_QMAX, torch.zeros_like(amax))
    # nan_to_num: a bf16 row with amax < 127 / FLT_MAX (~3.7e-37) has inv = inf, and 0 * inf = NaN;
    # such entries quantize to 0 (the kernels do the same; the NaN would otherwise reach an
    # undefined float -> int8 conversion).  Nothing changes for any other row.
    xq = torch.clamp(torch.round(x * inv[:, None]).nan_to_num_(0.0), -ACT_QMAX, ACT_QMAX).to(torch.int8)
    if kp is not None and kp > xq.shape[-1]:
        xq = torch.nn.functional.pad(xq, (0, kp - xq.shape[-1]))
    return xq, amax / ACT_QMAX


def group_partials(xq: torch.Tensor, q: torch.Tensor, group_size: int, q_float: torch.Tensor | None = None) -> torch.Tensor:
    """P[j, m, n] = sum_{k in group j} xq[m, k] * q[n, k], as int32 [G, M, N].

    Computed with a float32 matmul, which is exact here: every product and partial sum is an
    integer of magnitude <= 127 * 8 * g < 2**24 for g <= 16384.  ``q_float`` is an optional
    cached ``q.float()`` laid out [G, g, N].
    """
    m, kp = xq.shape
    g = group_size
    assert kp % g == 0 and q.shape[1] == kp, (xq.shape, q.shape, g)
    assert 127 * 8 * g < 2**24, "group too large for the exact float32 path"
    if q_float is None:
        q_float = weight_groups_float(q, g)
    xg = xq.float().reshape(m, kp // g, g).transpose(0, 1)  # [G, M, g]
    return torch.bmm(xg, q_float).to(torch.int32)  # [G, M, N]


def weight_groups_float(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 [N, Kp] -> float32 [G, g, N], the layout ``group_partials`` multiplies by."""
    n, kp = q.shape
    return q.float().reshape(n, kp // group_size, group_size).permute(1, 2, 0).contiguous()


def w4a8_is_accumulate(partials: torch.Tensor, iscale: torch.Tensor) -> torch.Tensor:
    """A[m, n] = sum_j iscale[n, j] * P[j, m, n] in int32 (the kernel's accumulator)."""
    acc = torch.zeros(partials.shape[1:], dtype=torch.int32)
    s = iscale.to(torch.int32).t()  # [G, N]
    for j in range(partials.shape[0]):
        acc += partials[j] * s[j][None, :]
    return acc


def w4a8_is_gemm(xq, t, q, iscale, cscale, alpha_log2: int, group_size: int, q_float=None, return_acc: bool = False):
    """Integer-scale W4A8 GEMM; returns y float32 [M, N] (and A int32 [M, N] if asked)."""
    acc = w4a8_is_accumulate(group_partials(xq, q, group_size, q_float), iscale)
    cs = cscale.float() / float(2**alpha_log2)  # exact: a power of two
    y = acc.float() * (t.float()[:, None] * cs[None, :])
    return (y, acc) if return_acc else y


def w4a8_fs_gemm(xq, t, q, scales, group_size: int, q_float=None):
    """Float-scale W4A8 GEMM; returns y float32 [M, N]."""
    p = group_partials(xq, q, group_size, q_float).float()  # [G, M, N]
    s = scales.float().t()  # [G, N]
    acc = torch.zeros(p.shape[1:], dtype=torch.float32)
    for j in range(p.shape[0]):
        acc += p[j] * s[j][None, :]
    return acc * t.float()[:, None]


def w4a8_fs_gemm_split(xq, t, q, scales, group_size: int, bounds, q_float=None):
    """Float-scale GEMM in the order of a split-K launch (w4a8_repacked.cu with S > 1): each split
    (g0, g1) of ``bounds`` sums its groups in order from 0.0, then the splits' sums are added in
    split order, then times t.  With one split this is ``w4a8_fs_gemm`` exactly."""
    p = group_partials(xq, q, group_size, q_float).float()  # [G, M, N]
    s = scales.float().t()  # [G, N]
    total = None
    for g0, g1 in bounds:
        acc = torch.zeros(p.shape[1:], dtype=torch.float32)
        for j in range(g0, g1):
            acc += p[j] * s[j][None, :]
        total = acc if total is None else total + acc
    return total * t.float()[:, None]


def linear_reference(x: torch.Tensor, layout: str, tensors: dict, group_size: int, bounds=None,
                     return_acc: bool = False):
    """What ``cuda.linear`` computes, on the CPU: per-token int8 quantization of x, the layout's
    GEMM (w4a8-fs in the split order ``bounds`` if given), rounded to x's dtype."""
    from qconvert.formats.packing import unpack_int4

    q = unpack_int4(tensors["qweight"].cpu())
    xq, t = quantize_per_token_int8(x.cpu(), q.shape[1])
    if layout == "w4a8-is":
        y, acc = w4a8_is_gemm(xq, t, q, tensors["iscale"].cpu(), tensors["cscale"].cpu(),
                              int(tensors["alpha_log2"].reshape(-1)[0]), group_size, return_acc=True)
        return (y.to(x.dtype), acc) if return_acc else y.to(x.dtype)
    if bounds is not None and len(bounds) > 1:
        y = w4a8_fs_gemm_split(xq, t, q, tensors["scales"].cpu(), group_size, bounds)
    else:
        y = w4a8_fs_gemm(xq, t, q, tensors["scales"].cpu(), group_size)
    return y.to(x.dtype)
