"""The online Hadamard transform, defined by its float32 arithmetic (bit-exact reference of
hadamard.cu).

For a width ``n = m * 2^lp`` and an integer Hadamard matrix ``A [m, m]`` (entries +-1; ``m = 1``
when n is a power of two) the transform of a row ``x [n]`` is

    y = (x @ (A (x) H_p)) * scale,      H_p the Sylvester matrix of order p = 2^lp,
                                         scale = float32(1 / sqrt(n))

computed exactly in this order, every operation rounded to float32:

  1. x is read as float32 (fp16 / bf16 widen exactly) and viewed as [m, p] (index a * p + b);
  2. butterflies s = 0 .. lp - 1, each over the pairs (i, i + 2^s) with bit s of i clear:
     (u, v) -> (u + v, u - v)  -- the fast Walsh-Hadamard transform of every row of the view;
  3. for each output (a', b): acc = 0, then for a = 0 .. m - 1 in order acc = acc + t[a, b] when
     A[a, a'] = +1, acc = acc - t[a, b] when -1;
  4. y[a' * p + b] = acc * scale, then rounded to the input's dtype (round to nearest even).

``A (x) H_p / sqrt(n)`` is orthogonal; folding its transpose into the next linear's weight
(``W -> W (A (x) H_p) / sqrt(n)``) keeps the layer's function: ``x W^T = (x Q)(W Q)^T``.
"""

from __future__ import annotations

import torch


def transform(x: torch.Tensor, sign: torch.Tensor, lp: int, scale: float) -> torch.Tensor:
    """``x [..., n]`` transformed over its last dimension (see the module docstring); ``sign``
    is A (int8 [m, m], +-1), ``n = m << lp``; ``scale`` a float32 value. Returns x's dtype."""
    m, p = sign.shape[0], 1 << lp
    if x.shape[-1] != m * p:
        raise ValueError(f"online Hadamard of order {m * p}: the input's last dimension is {x.shape[-1]}")
    shape = x.shape
    t = x.reshape(-1, m, p).to(torch.float32)
    for s in range(lp):
        h = 1 << s
        pairs = t.reshape(t.shape[0], m, p // (2 * h), 2, h)
        u, v = pairs[..., 0, :], pairs[..., 1, :]
        t = torch.stack((u + v, u - v), dim=-2).reshape(t.shape[0], m, p)
    acc = torch.zeros_like(t)
    plus = (sign > 0).to(torch.bool)
    for a in range(m):
        row = t[:, a : a + 1, :]  # [rows, 1, p], against every a'
        acc = torch.where(plus[a].view(1, m, 1), acc + row, acc - row)
    y = acc * torch.tensor(scale, dtype=torch.float32)
    return y.reshape(shape).to(x.dtype)
