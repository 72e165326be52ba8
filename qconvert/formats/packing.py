"""Bit packing of low-bit integers.

int4 layout (``pack_int4`` / ``unpack_int4``)
    input  : int8 tensor ``q`` of shape [N, K] with values in [-8, 7], K even
    output : uint8 tensor of shape [N, K // 2]
    byte ``b = packed[n, i]`` holds two's-complement nibbles
        ``q[n, 2i]   = b & 0x0F``  (low nibble, even column)
        ``q[n, 2i+1] = b >> 4``    (high nibble, odd column)
    so a row reads left to right, low nibble first.  Row-major, no padding inside a row:
    callers pad K to a multiple of the group size (and thus of 2) with zeros beforehand.

compressed-tensors' int4 words (``pack_int4_words`` / ``unpack_int4_words``)
    eight unsigned nibbles q + 8 per int32 word, value k of a row at bits 4 (k % 8) ..
    4 (k % 8) + 3 of word k // 8 (the ``pack-quantized`` format of compressed-tensors).
"""

from __future__ import annotations

import torch


def pad_columns(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x`` up to a multiple of ``multiple``."""
    k = x.shape[-1]
    kp = -(-k // multiple) * multiple
    if kp == k:
        return x
    return torch.nn.functional.pad(x, (0, kp - k))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] of shape [N, K] (K even) into uint8 [N, K // 2]."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values outside [-8, 7]")
    u = (q.to(torch.int16) & 0x0F).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 [N, K // 2] -> int8 [N, K] in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    lo = p & 0x0F
    hi = p >> 4
    both = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., K]: even col = low nibble
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def pack_int4_words(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> int32 [N, ceil(K / 8)], compressed-tensors' int4 packing.

    Value k of a row sits in word k // 8 at bits 4 (k % 8) .. 4 (k % 8) + 3 as the unsigned
    nibble q + 8; a last, partly filled word has zero bits above the row's end.  A word whose
    top nibble is >= 8 reads as a negative int32 (the same 32 bits).
    """
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"pack_int4_words expects a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4_words: values outside [-8, 7]")
    n, k = q.shape
    u = q.to(torch.int64) + 8
    u = torch.nn.functional.pad(u, (0, -k % 8))  # padding nibbles are 0, as compressed-tensors writes them
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (u.reshape(n, -1, 8) << shifts).sum(-1)  # in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4_words(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``pack_int4_words``: int32 [N, W] -> int8 [N, k] in [-8, 7]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int4_words expects int32, got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (packed.to(torch.int64)[..., None] >> shifts) & 0xF  # arithmetic shift; the mask keeps 4 bits
    return (nibbles.flatten(-2)[..., :k] - 8).to(torch.int8)
