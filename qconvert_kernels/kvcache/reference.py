"""The definition of kvcache.cu's write, in torch:

    k [B, H, T, Dk], v [B, H, T, Dv] (16-bit: float16 or bfloat16), cols int64 [T] (each in
    0 .. L - 1), caches kc [B, H, L, Dk] and vc [B, H, L, Dv] of the same dtype:
      kc[:, :, cols[t]] = k[:, :, t]    vc[:, :, cols[t]] = v[:, :, t]

That is the decode engine's two ``index_copy_`` along the column dimension; a copy, exact
whatever the values.  (The kernel leaves a column outside 0 .. L - 1 unwritten, where
``index_copy_`` raises; the engine never gives one.)
"""

from __future__ import annotations

import torch


def kv_write(k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> None:
    """Write ``k`` and ``v`` into the caches at ``cols``, in place."""
    kc.index_copy_(2, cols, k)
    vc.index_copy_(2, cols, v)
