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

NaN inputs give NaN outputs (their sign and payload are not specified).  The torch code below
works in place (a copy of x) and writes ``u - v`` as ``(-v) + u`` and ``acc +- t`` as
``acc + t * (+-1)``: each is the same single rounding as the definition's.

``A (x) H_p / sqrt(n)`` is orthogonal; folding its transpose into the next linear's weight
(``W -> W (A (x) H_p) / sqrt(n)``) keeps the layer's function: ``x W^T = (x Q)(W Q)^T``.
"""

from __future__ import annotations

import torch


def transform(x: torch.Tensor, sign: torch.Tensor, lp: int, scale: float) -> torch.Tensor:
    """``x [..., n]`` transformed over its last dimension (see the module docstring); ``sign``
    is A (int8 [m, m], +-1), ``n = m << lp``; ``scale`` a float32 value. Returns x's dtype."""
    y = unnormalized(x, sign, lp, torch.float32)
    return y.mul_(torch.tensor(scale, dtype=torch.float32)).to(x.dtype)


def unnormalized(x: torch.Tensor, sign: torch.Tensor, lp: int, dtype: torch.dtype) -> torch.Tensor:
    """Each row of ``x [..., n]`` times A (x) H_p, unnormalized, computed in ``dtype`` (x is not
    changed): the butterflies (u, v) -> (u + v, u - v), then the +-1 combination of A's rows.
    Shared by ``transform`` (float32) and the I-LLM runtime's integer transform (int64)."""
    m, p = sign.shape[0], 1 << lp
    if x.shape[-1] != m * p:
        raise ValueError(f"online Hadamard of order {m * p}: the input's last dimension is {x.shape[-1]}")
    t = x.reshape(-1, m, p).to(dtype, copy=True)  # worked on in place
    rows = t.shape[0]
    for s in range(lp):
        h = 1 << s
        pairs = t.view(rows, m, p // (2 * h), 2, h)
        u, v = pairs[..., 0, :], pairs[..., 1, :]
        first = u.clone()
        u.add_(v)  # u + v
        v.neg_().add_(first)  # (-v) + u: the same rounding (and signed zeros) as u - v
    acc = torch.zeros_like(t)
    sign_t = sign.to(device=t.device, dtype=t.dtype)  # A (a constant kept on the CPU) where x is
    for a in range(m):
        # acc + t[a] * (+-1): the product is exact, so one rounding, as acc +- t[a]
        acc.addcmul_(t[:, a : a + 1, :], sign_t[a].view(1, m, 1))
    return acc.reshape(x.shape)
