"""The definition of norm.cu's RMSNorm, bit for bit, in torch float32 (each op IEEE-rounded):

    per row of x [rows, n] (fp16 / bf16, widened exactly to float32):
      acc[t] = ((0 + x[t]^2) + x[t + 256]^2) + ...            t = 0..255, each product and sum rounded
      warp w's lanes: acc = acc + acc[lane ^ o] for o = 16, 8, 4, 2, 1   (every lane the same sum)
      total = ((s_0 + s_1) + s_2) + ... + s_7                  s_w: warp w's sum
      r = 1 / sqrt(total / n + eps)                            each of /, +, sqrt, / rounded
      y = dtype(w * float(dtype(x * r)))                       w [n] of x's dtype

(r's division and square root are taken in float64 and rounded once: for n <= 2^24 that is the
correctly rounded float32 result.)  A NaN output (from an inf or NaN input) is NaN here and on the
GPU, its bit pattern not necessarily the same (cvt.rn gives the canonical NaN).

The Llama-family RMSNorm of transformers (``w * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)``)
differs only in the order of the mean's sum and in rsqrt's rounding (float32, before the result is
rounded to fp16 / bf16): measured, equal but for a unit in the last place in about one output in
a thousand or fewer (tests/test_kernels_norm.py).
"""

from __future__ import annotations

import torch

THREADS = 256
WARPS = THREADS // 32


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """float32 [rows] in the kernel's order (x float32 [rows, n])."""
    rows, n = x.shape
    chunks = -(-n // THREADS)
    pad = torch.zeros(rows, chunks * THREADS, dtype=torch.float32)
    pad[:, :n] = x
    acc = torch.zeros(rows, THREADS, dtype=torch.float32)
    for c in range(chunks):  # thread t: elements t, t + 256, ... in order (a padding zero adds 0 exactly)
        v = pad[:, c * THREADS:(c + 1) * THREADS]
        acc = acc + v * v
    lane = torch.arange(32)
    acc = acc.reshape(rows, WARPS, 32)
    for o in (16, 8, 4, 2, 1):
        acc = acc + acc[:, :, lane ^ o]
    total = acc[:, 0, 0]
    for w in range(1, WARPS):
        total = total + acc[:, w, 0]
    return total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm.cu's RMSNorm of x [..., n] (float16 / bfloat16) with weight [n] of x's dtype."""
    shape, dtype = x.shape, x.dtype
    n = shape[-1]
    xf = x.reshape(-1, n).cpu().float()
    total = sum_of_squares(xf)
    eps32 = torch.tensor(eps, dtype=torch.float32)
    # division and square root in float64, then rounded once to float32: correctly rounded (53 >=
    # 2 * 24 + 2 bits makes the double rounding innocuous), as __fdiv_rn and __fsqrt_rn are; torch's
    # own float32 sqrt on a CPU need not be (it is a unit in the last place off on AVX-512 builds)
    var = (total.double() / n).float()
    root = torch.sqrt((var + eps32).double()).float()
    r = (1.0 / root.double()).float()
    h = (xf * r[:, None]).to(dtype).float()
    y = (weight.cpu().float()[None, :] * h).to(dtype)
    return y.reshape(shape).to(x.device)
