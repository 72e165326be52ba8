"""Quantization grids: how a group of weights is scaled and rounded.

A grid object is what the solvers (qconvert/solvers/gptq.py, and round-to-nearest) call; it never
sees the rest of the matrix.  ``IntGrid`` is the symmetric integer grid of every int layout;
``ZeroPointGrid`` the asymmetric one (a zero point per group, weight-only int4); ``FP4Grid`` the E2M1 grid of ZeroQuant-FP (qconvert/methods/zeroquant_fp.py builds it).  The range
search that shrinks a group's scale is the grid's ``clip`` tuple: ``clip_factors`` makes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconvert.formats import fp4
from qconvert.formats.packing import pad_columns
from qconvert.layouts.fp8 import E_MAX, E_MIN
from qconvert.solvers.rtn import FP16_TINY
from qconvert_kernels.fp8.reference import E2M1_MAX

CLIP_STEP = 0.025  # the range search's step: scales shrunk by 1.0, 0.975, ... down to clip_min


def clip_factors(clip_min: float, step: float = CLIP_STEP) -> tuple[float, ...]:
    """1.0, 1 - step, ... down to ``clip_min`` (1.0 alone: no search)."""
    steps = int(round((1.0 - clip_min) / step))
    return tuple(1.0 - step * i for i in range(steps + 1))


@dataclass
class IntGrid:
    """Symmetric integer grid [-2^(b-1), 2^(b-1) - 1], zero point 0, one scale per (row, group).

    The scale maps the group's extreme onto +qmax or onto -(qmax + 1), whichever side it lies
    (as ``rtn.quantize_groups_symmetric``), shrunk by the factor in ``clip`` that minimises the
    diag-H-weighted squared error of the group (1.0 alone: plain round-to-nearest range).
    Scales are rounded to fp16 so storing them as fp16 loses nothing.  ``narrow``: the levels
    [-qmax, qmax] instead (no -2^(b-1); the symmetric int8 grid of W8A8 serving kernels).
    """

    bits: int = 4
    clip: tuple[float, ...] = (1.0,)
    narrow: bool = False
    zero_points = False  # one scale per group, no zero point (``ZeroPointGrid`` has both)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -self.qmax if self.narrow else -self.qmax - 1

    def scales(self, w: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scales [N] for the group columns ``w`` [N, g]; ``weight`` [g] is the importance of each."""
        qmax = self.qmax
        pos = w.amax(dim=1).clamp_min(0) / qmax
        neg = (-w.amin(dim=1)).clamp_min(0) / -self.qmin
        base = torch.maximum(pos, neg)
        if len(self.clip) == 1:
            return (base * self.clip[0]).clamp_min(FP16_TINY).half().float()
        clip = torch.tensor(self.clip, dtype=w.dtype, device=w.device)
        cand = (base[None, :] * clip[:, None]).clamp_min(FP16_TINY).half().float()
        q = torch.clamp(torch.round(w[None] / cand[..., None]), self.qmin, qmax)  # [C, N, g]
        err = (q * cand[..., None] - w[None]).square_()
        if weight is not None:
            err = err * weight
        best = err.sum(-1).argmin(0)  # [N]
        return cand.gather(0, best[None]).squeeze(0)

    def quantize(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Integer levels (as float) of ``w`` under scales ``s`` (same leading shape)."""
        return torch.clamp(torch.round(w / s), self.qmin, self.qmax)


@dataclass
class ZeroPointGrid:
    """Asymmetric integer grid: levels q in [-2^(b-1), 2^(b-1) - 1] and, per (row, group), a scale s
    and an integer zero point z in the same range, W ~= s · (q - z) (compressed-tensors' asymmetric
    int groups, vLLM's uint4 with zero points).

    The group's range [min(W, 0), max(W, 0)] is spread over all 2^b levels, s = (max - min) / (2^b - 1)
    rounded to fp16, z = qmin - round(min / s); the range search shrinks both ends by the factor in
    ``clip`` that minimises the diag-H-weighted squared error.  A symmetric grid leaves part of one
    side's levels unused whenever a group's extremes differ; this one does not, at the cost of a
    zero point per group.
    """

    bits: int = 4
    clip: tuple[float, ...] = (1.0,)
    zero_points = True  # GPTQ asks the grid for (scales, zeros) and quantizes with both

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def params(self, w: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales [N], zeros [N] as float integers) for the group columns ``w`` [N, g]."""
        hi, lo = w.amax(dim=1).clamp_min(0), w.amin(dim=1).clamp_max(0)
        clip = torch.tensor(self.clip, dtype=w.dtype, device=w.device)[:, None]  # [C, 1]
        s = ((hi - lo)[None] * clip / (self.qmax - self.qmin)).clamp_min(FP16_TINY).half().float()  # [C, N]
        z = torch.clamp(self.qmin - torch.round(lo[None] * clip / s), self.qmin, self.qmax)
        if len(self.clip) == 1:
            return s[0], z[0]
        err = ((self.quantize(w[None], s[..., None], z[..., None]) - z[..., None]) * s[..., None] - w[None]).square_()
        if weight is not None:
            err = err * weight
        best = err.sum(-1).argmin(0)[None]  # [1, N]
        return s.gather(0, best).squeeze(0), z.gather(0, best).squeeze(0)

    def quantize(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Stored levels q (as float) of ``w`` under scales ``s`` and zeros ``z``: W ~= s · (q - z)."""
        return torch.clamp(torch.round(w / s) + z, self.qmin, self.qmax)


def rtn_zero_point(weight: torch.Tensor, grid: ZeroPointGrid, group_size: int):
    """Round-to-nearest on the asymmetric grid: (q int8 [N, Kp] with 0 in the padding columns,
    scales float32 [N, G], zeros float32 [N, G])."""
    n, k = weight.shape
    groups = pad_columns(weight.float(), group_size).reshape(-1, group_size)
    s, z = grid.params(groups)
    q = grid.quantize(groups, s[:, None], z[:, None]).reshape(n, -1)
    q[:, k:] = 0
    g = q.shape[1] // group_size
    return q.to(torch.int8), s.reshape(n, g), z.reshape(n, g)


@dataclass
class FP4Grid:
    """E2M1 grid for GPTQ (the interface of ``qconvert.gptq.IntGrid``), with per-row scales c [N].

    ``scales(w [N, g], weight [g]) -> [N]`` returns c * 2^(e - 1) for the chosen exponent e;
    ``quantize(w, s)`` returns the integer levels 2 * round_e2m1(w / 2s) in [-12, 12].
    """

    row_scale: torch.Tensor  # c [N], float32 > 0
    search: bool = True
    zero_points = False

    def exponents(self, w: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """e int64 [N] for the group columns ``w`` [N, g] (or [N, G] for all groups ``w`` [N, G, g],
        ``weight`` [G, g])."""
        return self.exponents_and_errors(w, weight)[0]

    def exponents_and_errors(self, w: torch.Tensor, weight: torch.Tensor | None = None):
        """(e, the weighted squared error of the group under it; None without ``search``)."""
        lead = (-1,) + (1,) * (w.dim() - 2)
        c = self.row_scale.double().reshape(lead)
        amax = w.double().abs().amax(dim=-1)
        e = torch.ceil(torch.log2((amax / (E2M1_MAX * c)).clamp_min(2.0**E_MIN))).clamp(E_MIN, E_MAX)
        e = e + (amax > E2M1_MAX * c * pow2(e).double()).double()  # log2 rounded down: one up
        e = e - (amax <= E2M1_MAX * c * pow2(e - 1).double()).double()  # rounded up: one down
        e = e.clamp(E_MIN, E_MAX).long()
        if not self.search:
            return e, None
        best, best_err = e, None
        cf = self.row_scale.float().reshape(lead)
        for cand in (e, (e - 1).clamp_min(E_MIN)):
            sc = (cf * pow2(cand))[..., None]
            err = (_round_e2m1(w / sc) * sc - w).square()
            if weight is not None:
                err = err * weight
            err = err.sum(-1)
            if best_err is None:
                best_err = err
            else:
                best = torch.where(err < best_err, cand, best)
                best_err = torch.minimum(err, best_err)
        return best, best_err

    def scales(self, w: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.row_scale.float() * pow2(self.exponents(w, weight) - 1)

    def quantize(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return _round_e2m1(w / (2 * s)) * 2


_E2M1_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """``qconvert.formats.fp4.round_e2m1`` on the device of ``v``: on the CPU that very function;
    elsewhere the same bucketize against copies of its tables on that device."""
    if v.device.type == "cpu":
        return fp4.round_e2m1(v)
    if v.device not in _E2M1_TABLES:
        _E2M1_TABLES[v.device] = (fp4._BOUNDS.to(v.device), fp4._MAGNITUDES.to(v.device))
    bounds, mags = _E2M1_TABLES[v.device]
    v = v.float()
    mag = mags[torch.bucketize(v.abs().contiguous(), bounds)]
    return torch.where(v < 0, -mag, mag) + 0.0  # -0 + 0 = +0


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32, exactly (e integer, E_MIN - 1 <= e <= E_MAX)."""
    return torch.ldexp(torch.ones(e.shape, device=e.device), e.long())
