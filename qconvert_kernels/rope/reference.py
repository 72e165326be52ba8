"""The definition of rope.cu's rotary embedding, bit for bit, in torch float32 (each op rounded):

    q [B, Hq, T, D], k [B, Hk, T, D], cos and sin [B or 1, T, D], all fp16 or all bf16; h = D / 2;
    for x each head of q and of k, at token (b, t), with c = cos[b, t] and s = sin[b, t]:
      y[i]     = dtype(dtype(x[i] * c[i])         + dtype(-x[i + h] * s[i]))        i < h
      y[i + h] = dtype(dtype(x[i + h] * c[i + h]) + dtype(x[i] * s[i + h]))

That is transformers' ``apply_rotary_pos_emb`` (``q * cos + rotate_half(q) * sin``, the tables
unsqueezed on dimension 1) written out: each of its torch ops on fp16 / bf16 tensors computes in
float32 and rounds once to the dtype, so the two agree bit for bit (tests/test_kernels_rope.py
checks it against the installed transformers).  A NaN output (from an inf or NaN input) is NaN
here and on the GPU, its bit pattern not necessarily the same.
"""

from __future__ import annotations

import torch


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope.cu's (q, k) rotated: each [B, H, T, D] of the input's dtype, contiguous."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype, half = x.dtype, x.shape[-1] // 2

    def rnd(v: torch.Tensor) -> torch.Tensor:
        return v.to(dtype).float()

    xf = x.float()
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)  # [B or 1, 1, T, D]
    x1, x2 = xf[..., :half], xf[..., half:]
    y1 = rnd(rnd(x1 * c[..., :half]) + rnd(-x2 * s[..., :half]))
    y2 = rnd(rnd(x2 * c[..., half:]) + rnd(x1 * s[..., half:]))
    return torch.cat([y1, y2], dim=-1).to(dtype).contiguous()
