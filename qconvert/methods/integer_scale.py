"""Integer Scale W4A8 (Li et al., 2024): int4 group weights whose group scales are integers.

Float group scales s[n, j] become integers   ŝ[n, j] = max(1, round(s[n, j] / c[n] * 2**a))
with c[n] = max_j s[n, j], so group partial sums are scaled and summed in int32 and turned
into float once per output (qconvert_kernels/reference.py).  The amplifier α = 2**a is the
largest for which the exact worst case over all int8 inputs fits in int32:

    B[n] = 127 * sum_j ŝ[n, j] * sum_{k in j} |q[n, k]|   <=   2**31 - 1   for every n

(every partial sum on the way is bounded by B[n] too, as all terms of the bound are >= 0
and an adversary reaches it with x = 127 * sign(q[n])).  ``scales = "float"`` keeps the
float group scales instead: the paper's counterpart, same integer weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from qconvert.errors import QConvertError
from qconvert.formats.packing import pack_int4
from qconvert.methods.base import QuantizedLinear
from qconvert.methods.rtn import quantize_groups_symmetric, row_chunks
from qconvert_kernels.reference import ACT_QMAX

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class IntegerScaleConfig:
    weight_bits: int = 4
    group_size: int = 128
    scales: str = "integer"  # "integer" (Integer Scale) or "float" (the counterpart)
    solver: str = "rtn"
    act_bits: int = 8
    max_alpha_log2: int = 30

    def __post_init__(self):
        if self.weight_bits != 4:
            raise QConvertError(f"integer-scale: weight_bits={self.weight_bits} is not supported; use 4")
        if self.act_bits != 8:
            raise QConvertError(f"integer-scale: act_bits={self.act_bits} is not supported; use 8")
        if not (isinstance(self.group_size, int) and 2 <= self.group_size <= 8192 and self.group_size % 2 == 0):
            raise QConvertError(f"integer-scale: group_size={self.group_size!r} must be an even integer in 2..8192 (128 is the default)")
        if self.scales not in ("integer", "float"):
            raise QConvertError(f"integer-scale: scales={self.scales!r} must be 'integer' or 'float'")
        if self.solver != "rtn":
            raise QConvertError(f"integer-scale: solver={self.solver!r} is not available in this release; use 'rtn'")
        if not (type(self.max_alpha_log2) is int and 0 <= self.max_alpha_log2 <= 30):
            raise QConvertError(f"integer-scale: max_alpha_log2={self.max_alpha_log2} must be in 0..30")


def group_abs_sums(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """T[n, j] = sum_{k in group j} |q[n, k]| as int64 [N, G]."""
    n = q.shape[0]
    return q.abs().reshape(n, -1, group_size).sum(-1, dtype=torch.int64)  # |-8| fits int8


def overflow_bound(iscale: torch.Tensor, abs_sums: torch.Tensor, xmax: int = ACT_QMAX) -> torch.Tensor:
    """B[n] = xmax * sum_j ŝ[n, j] * T[n, j] (int64 [N]): the largest |A[m, n]| any input can give."""
    return xmax * (iscale.to(torch.int64) * abs_sums).sum(-1)


def integer_scales(scales: torch.Tensor, alpha_log2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŝ int64 [N, G] >= 1, c float32 [N]) for the amplifier 2**alpha_log2."""
    c = scales.amax(dim=-1)
    s_hat = torch.round(scales / c[:, None] * float(2**alpha_log2)).clamp_min(1).to(torch.int64)
    return s_hat, c


def choose_alpha(scales: torch.Tensor, abs_sums: torch.Tensor, max_alpha_log2: int, xmax: int = ACT_QMAX):
    """Largest a <= max_alpha_log2 whose bound fits int32; returns (a, ŝ, c, bound)."""
    for a in range(max_alpha_log2, -1, -1):
        s_hat, c = integer_scales(scales, a)
        if float(xmax * (s_hat.double() * abs_sums.double()).sum(-1).max()) > 2.0**40:
            continue  # far past int32, and the exact int64 sum itself could wrap
        bound = overflow_bound(s_hat, abs_sums, xmax)
        if int(bound.max()) <= INT32_MAX:
            return a, s_hat, c, bound
    raise QConvertError(
        "integer-scale: even α = 1 can overflow int32 for this layer (in_features too large); "
        "use a smaller group_size or the float-scale scheme w4a8-fs"
    )


class IntegerScaleMethod:
    """Method plugin ``integer-scale`` (presets is-w4a8 and w4a8-fs)."""

    name = "integer-scale"
    needs_calibration = False

    def __init__(self, params: dict):
        try:
            self.config = IntegerScaleConfig(**params)
        except TypeError as e:
            allowed = ", ".join(IntegerScaleConfig.__dataclass_fields__)
            raise QConvertError(f"integer-scale: {e}; allowed parameters: {allowed}") from e

    def describe(self) -> dict:
        cfg = self.config
        return {
            **asdict(cfg),
            "weights": {"bits": cfg.weight_bits, "symmetric": True, "granularity": "group", "group_size": cfg.group_size},
            "activations": {"bits": cfg.act_bits, "symmetric": True, "granularity": "per-token", "dynamic": True, "qmax": ACT_QMAX},
        }

    def quantize_linear(self, name: str, weight: torch.Tensor) -> QuantizedLinear:
        cfg = self.config
        n, k = weight.shape
        packed, scale_rows, sum_rows = [], [], []
        for rows in row_chunks(weight):  # bounded temporaries, whatever the layer's size
            gq = quantize_groups_symmetric(rows, cfg.weight_bits, cfg.group_size)
            packed.append(pack_int4(gq.q))
            scale_rows.append(gq.scales)
            sum_rows.append(group_abs_sums(gq.q, cfg.group_size))
        scales, abs_sums = torch.cat(scale_rows), torch.cat(sum_rows)
        tensors = {"qweight": torch.cat(packed), "shape": torch.tensor([n, k], dtype=torch.int64)}
        info = {"shape": [n, k], "bits": cfg.weight_bits, "group_size": cfg.group_size}
        if cfg.scales == "float":
            tensors["scales"] = scales.half()  # exact: the RTN scales are fp16 numbers
            info.update(layout="w4a8-fs")
            return QuantizedLinear("w4a8-fs", tensors, info)
        a, s_hat, c, bound = choose_alpha(scales, abs_sums, cfg.max_alpha_log2)
        worst_n = int(bound.argmax())
        tensors.update(
            iscale=s_hat.to(torch.int32),
            cscale=c.float(),
            alpha_log2=torch.tensor([a], dtype=torch.int32),
        )
        info.update(
            layout="w4a8-is",
            alpha_log2=a,
            bound=int(bound[worst_n]),
            worst_channel=worst_n,
            # an all-zero weight has bound 0: no input can overflow it; report 31 bits
            headroom_bits=round(math.log2(INT32_MAX / max(int(bound[worst_n]), 1)), 3),
        )
        return QuantizedLinear("w4a8-is", tensors, info)
