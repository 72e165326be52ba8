"""The load-time weight layout of the repacked W4A8 kernels (w4a8_repacked.cu), and its inverse.

The on-disk layout (format v1, docs/format.md) stays as it is: ``qweight`` uint8 [N, Kp/2], two's
complement int4, low nibble = even column.  At load time ``repack_weight`` rewrites it once into
the order the tensor-core fragments consume ("W4R"), so that in the kernels a lane's single 16-byte
load is its A fragment for two k steps, a warp's loads are 512 contiguous bytes, and three integer
instructions turn a word into mma operands:

    W4R  uint32 [T16 = N128/16][KB = Kq/64][32 lanes][4 words]   (returned as uint8, 16 bytes per lane)
    lane = 4 * gid + tig;  word j of lane (gid, tig) of (tile t, block kb):
        row  n = 16 t + gid + 8 (j & 1)
        step ks = 2 kb + (j >> 1)            (a k step = 32 k)
        the 8 nibbles of k = 32 ks + 8 tig + 0..7, interleaved: nibble position 2i holds k + i,
        position 2i + 1 holds k + 4 + i (i = 0..3)
    N128 = N rounded up to 128 (the CTA width), Kq = Kp rounded up to 64; padding is zero.

Why the interleave: ``w & 0xF0F0F0F0`` is then the bytes 16 q[k+4..k+7] and ``(w << 4) & 0xF0F0F0F0``
the bytes 16 q[k..k+3], already sign-correct int8 (qk::int4x4_hi16 / lo16 in common.cuh).

Scales are transposed to [G, N128] (``repack_scales``) so the 128 channels of a CTA read one
group's scales from 256 / 512 contiguous bytes.  The integer scales are stored as int16 when every
value fits (half the scale bytes; ``iscale_dtype``).
"""

from __future__ import annotations

import torch

BN = 128           # channels per CTA (w4r::BN)
KBLOCK = 64        # k per repacked block (one 16-byte lane chunk holds 2 k steps of 32)
LANE_BYTES = 16


def round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _words(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [R, C] (C % 4 == 0) -> int64 [R, C/4] little-endian 32-bit words (values 0..2^32-1)."""
    b = qweight.to(torch.int64).reshape(qweight.shape[0], -1, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _bytes(words: torch.Tensor) -> torch.Tensor:
    """int64 words (0..2^32-1) [..., W] -> uint8 [..., 4W], little-endian."""
    parts = [(words >> (8 * i)) & 0xFF for i in range(4)]
    return torch.stack(parts, dim=-1).reshape(*words.shape[:-1], -1).to(torch.uint8)


def interleave_nibbles(words: torch.Tensor) -> torch.Tensor:
    """Nibble i (k + i) of each 32-bit word -> position 2i (i < 4) or 2(i - 4) + 1 (i >= 4)."""
    out = torch.zeros_like(words)
    for i in range(8):
        pos = 2 * i if i < 4 else 2 * (i - 4) + 1
        out |= ((words >> (4 * i)) & 0xF) << (4 * pos)
    return out


def deinterleave_nibbles(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``interleave_nibbles``."""
    out = torch.zeros_like(words)
    for i in range(8):
        pos = 2 * i if i < 4 else 2 * (i - 4) + 1
        out |= ((words >> (4 * pos)) & 0xF) << (4 * i)
    return out


def repack_weight(qweight: torch.Tensor) -> torch.Tensor:
    """qweight uint8 [N, Kp/2] (on-disk layout) -> W4R uint8 [T16 * KB * 32 * 16] (see the module
    docstring), on qweight's device.  Kp is any multiple of 32 (8 nibbles per word, 4 words per
    k step: Kp/2 % 16 == 0 is what the format guarantees for g % 32 == 0)."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"repack_weight: qweight must be uint8 [N, Kp/2], got {qweight.dtype} {tuple(qweight.shape)}")
    n, kp2 = qweight.shape
    kp = 2 * kp2
    if kp % 32:
        raise ValueError(f"repack_weight: Kp={kp} must be a multiple of 32")
    n128, kq = round_up(max(n, 1), BN), round_up(kp, KBLOCK)
    padded = torch.zeros((n128, kq // 2), dtype=torch.uint8, device=qweight.device)
    padded[:n, :kp2] = qweight
    w = interleave_nibbles(_words(padded))                # [N128, Kq/8]: word index = k / 8
    t16, kb = n128 // 16, kq // KBLOCK
    # n = 16 t + 8 h + gid, word = 8 kb + 4 s + tig   ->   [t][kb][gid][tig][s][h], j = 2 s + h
    w = w.reshape(t16, 2, 8, kb, 2, 4).permute(0, 3, 2, 5, 4, 1).contiguous()
    return _bytes(w.reshape(t16, kb, 32, 4)).reshape(-1)


def unrepack_weight(w4r: torch.Tensor, n: int, kp: int) -> torch.Tensor:
    """Inverse of ``repack_weight``: W4R bytes -> qweight uint8 [N, Kp/2] (padding dropped)."""
    n128, kq = round_up(max(n, 1), BN), round_up(kp, KBLOCK)
    t16, kb = n128 // 16, kq // KBLOCK
    w = _words(w4r.reshape(-1, 4)).reshape(t16, kb, 8, 4, 2, 2)   # [t][kb][gid][tig][s][h]
    w = w.permute(0, 5, 2, 1, 4, 3).reshape(n128, kq // 8)        # -> [t][h][gid][kb][s][tig]
    return _bytes(deinterleave_nibbles(w))[:n, : kp // 2].contiguous()


def iscale_dtype(iscale: torch.Tensor) -> torch.dtype:
    """int16 when every integer scale fits (checked once at load time), else int32."""
    if iscale.numel() and (int(iscale.min()) < -(2**15) or int(iscale.max()) >= 2**15):
        return torch.int32
    return torch.int16


def repack_scales(scales: torch.Tensor, n128: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[N, G] -> [G, N128] contiguous, channels past N zero (their weights are zero too)."""
    n, g = scales.shape
    out = torch.zeros((g, n128), dtype=dtype or scales.dtype, device=scales.device)
    out[:, :n] = scales.t().to(out.dtype)
    return out
