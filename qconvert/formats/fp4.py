"""FP4 (E2M1) rounding, codes and packing.

E2M1 code (4 bits, ``s e1 e0 m``): sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0.

    code & 7 :  0    1    2    3    4    5    6    7
    value    :  0   0.5  1.0  1.5  2.0  3.0  4.0  6.0        (code | 8: the negative)

``round_e2m1`` rounds to the nearest value, ties to the even code (m = 0), saturating at +-6;
zero is always code 0 (never the -0 code 8).

Packed layout (``pack_fp4`` / ``unpack_fp4``), like ``pack_int4``:
    input  : uint8 codes [N, K] in 0..15, K even
    output : uint8 [N, K // 2]; byte ``b = packed[n, i]`` holds code[n, 2i] in ``b & 0x0F``
             (low nibble, even column) and code[n, 2i+1] in ``b >> 4`` (high nibble, odd column).
    Row-major, no padding inside a row; callers pad K to the group size first (code 0 = 0.0).
"""

from __future__ import annotations

import torch

from qconvert_kernels.fp8.reference import e2m1_codebook

# twice the E2M1 magnitudes, as integers: the "levels" GPTQ handles (see methods/zeroquant_fp.py)
_LEVEL_TO_CODE = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 8: 6, 12: 7}


# Decision points between consecutive magnitudes.  At a tie the even code (m = 0) wins: 0.25 -> 0,
# 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.  bucketize (right=False) sends a value
# equal to a boundary down, so the boundaries whose tie goes up are moved one float32 ulp down
# (no float32 lies strictly between that and the midpoint).
_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
_BOUNDS[[1, 3, 5]] = torch.nextafter(_BOUNDS[[1, 3, 5]], torch.zeros(3))
_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of ``v`` (computed in float32), ties to the even code, saturating at
    +-6; zero is always +0.  Returns float32."""
    v = v.float()
    mag = _MAGNITUDES[torch.bucketize(v.abs().contiguous(), _BOUNDS)]
    return torch.where(v < 0, -mag, mag) + 0.0  # -0 + 0 = +0


def levels_to_codes(levels: torch.Tensor) -> torch.Tensor:
    """Integer levels 2 * value (in {0, +-1, +-2, +-3, +-4, +-6, +-8, +-12}) -> uint8 codes."""
    lut = torch.full((13,), -1, dtype=torch.int16)
    for lev, code in _LEVEL_TO_CODE.items():
        lut[lev] = code
    lv = levels.to(torch.int16)
    mag = lut[lv.abs().clamp_max(12).long()]
    if levels.numel() and int(mag.min()) < 0:
        raise ValueError("levels_to_codes: a level is not twice an E2M1 value")
    return (mag | ((lv < 0).to(torch.int16) << 3)).to(torch.uint8)


def values_to_codes(values: torch.Tensor) -> torch.Tensor:
    """Exact E2M1 values (float) -> uint8 codes."""
    return levels_to_codes(torch.round(values.float() * 2))


def codes_to_values(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 values."""
    return e2m1_codebook()[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (K even, values 0..15) -> uint8 [N, K // 2], low nibble = even column."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_fp4 expects uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even number of columns, got {codes.shape[-1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_fp4: codes outside 0..15")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_fp4``: uint8 [N, K // 2] -> uint8 codes [N, K]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_fp4 expects uint8, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
