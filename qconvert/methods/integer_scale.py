"""Integer Scale W4A8 (Li et al., 2024): int4 group weights whose group scales are integers.

Float group scales s[n, j] become integers   ŝ[n, j] = max(1, round(s[n, j] / c[n] * 2**a))
with c[n] = max_j s[n, j], so group partial sums are scaled and summed in int32 and turned
into float once per output (qconvert_kernels/w4a8/reference.py).  The amplifier α = 2**a is the
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
from qconvert.formats.packing import pack_int4, pad_columns
from qconvert.layouts.int4 import INT32_MAX, group_abs_sums, overflow_bound
from qconvert.methods.base import Method, QuantizedLinear, check_solver_params
from qconvert.solvers.gptq import gptq, relative_output_error
from qconvert.solvers.grids import IntGrid, ZeroPointGrid, clip_factors, rtn_zero_point
from qconvert.solvers.rtn import quantize_groups_symmetric, row_chunks
from qconvert_kernels.w4a8.reference import ACT_QMAX


@dataclass(frozen=True)
class IntegerScaleConfig:
    weight_bits: int = 4
    group_size: int = 128
    scales: str = "integer"  # "integer" (Integer Scale) or "float" (the counterpart)
    base: str = "gptq"  # the weight solver: "gptq" (calibrated, qconvert/solvers/gptq.py) or "rtn"
    act_bits: int = 8  # 8: dynamic per-token int8; 16: weight-only (activations stay float)
    max_alpha_log2: int = 30
    damp: float = 0.01  # GPTQ dampening, a fraction of mean(diag H)
    act_order: bool = True  # GPTQ column order by decreasing diag H (groups stay in channel order)
    clip_min: float = 0.7  # GPTQ range search: scales shrunk by 1.0, 0.975, ... down to clip_min (1: off)
    symmetric: bool = True  # False: a zero point per group (weight-only only: layout w4a16-zp)

    def __post_init__(self):
        if self.weight_bits != 4:
            raise QConvertError(f"integer-scale: weight_bits={self.weight_bits} is not supported; use 4")
        if self.act_bits not in (8, 16):
            raise QConvertError(f"integer-scale: act_bits={self.act_bits} is not supported; use 8 (W4A8) or 16 (weight-only)")
        if not (isinstance(self.group_size, int) and 2 <= self.group_size <= 8192 and self.group_size % 2 == 0):
            raise QConvertError(f"integer-scale: group_size={self.group_size!r} must be an even integer in 2..8192 (128 is the default)")
        if self.scales not in ("integer", "float"):
            raise QConvertError(f"integer-scale: scales={self.scales!r} must be 'integer' or 'float'")
        if self.act_bits == 16 and self.scales != "float":
            raise QConvertError("integer-scale: weight-only (act_bits = 16) keeps float scales; set scales = 'float'")
        if not (type(self.max_alpha_log2) is int and 0 <= self.max_alpha_log2 <= 30):
            raise QConvertError(f"integer-scale: max_alpha_log2={self.max_alpha_log2} must be in 0..30")
        if not isinstance(self.symmetric, bool):
            raise QConvertError(f"integer-scale: symmetric={self.symmetric!r} must be true or false")
        if not self.symmetric and self.act_bits != 16:
            raise QConvertError("integer-scale: zero points (symmetric = false) are for weight-only int4 (act_bits = 16, "
                                "as w4a16-gptq); the W4A8 kernels take symmetric weights")
        check_solver_params("integer-scale", self.base, self.damp, self.clip_min, self.act_order)

    def grid(self, search: bool = True) -> IntGrid | ZeroPointGrid:
        clip = clip_factors(self.clip_min) if search else (1.0,)
        return IntGrid(self.weight_bits, clip) if self.symmetric else ZeroPointGrid(self.weight_bits, clip)


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


class IntegerScaleMethod(Method):
    """Method plugin ``integer-scale`` (presets is-w4a8, is-w4a8-rtn, w4a8-fs, w4a16-gptq, w4a16-gptq-zp)."""

    name = "integer-scale"
    config_class = IntegerScaleConfig

    def describe(self) -> dict:
        cfg = self.config
        act = (
            {"bits": 16, "dynamic": False, "note": "not quantized (weight-only)"} if cfg.act_bits == 16 else
            {"bits": cfg.act_bits, "symmetric": True, "granularity": "per-token", "dynamic": True, "qmax": ACT_QMAX}
        )
        return {
            **asdict(cfg),
            "weights": {"bits": cfg.weight_bits, "symmetric": cfg.symmetric, "granularity": "group",
                        "group_size": cfg.group_size},
            "activations": act,
        }

    def activation_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """What the runtime does to a linear's input, in float: the per-token int8 round trip
        of ``quantize_per_token_int8`` (same levels, same scale), without the int8 tensor."""
        if self.config.act_bits == 16:
            return x
        xf = x.float()
        amax = torch.linalg.vector_norm(xf, ord=float("inf"), dim=-1, keepdim=True)  # max |x|, one pass
        inv = torch.where(amax > 0, amax.reciprocal() * ACT_QMAX, torch.zeros_like(amax))
        # |x · inv| <= amax · (127 / amax) rounds to at most 127: no clamp needed
        return torch.mul(xf, inv).round_().mul_(amax / ACT_QMAX).to(x.dtype)

    def quantize_linear(self, name: str, weight: torch.Tensor) -> QuantizedLinear:
        """Round-to-nearest (no calibration), in bounded row chunks whatever the layer's size."""
        k = weight.shape[1]
        parts = [self._round_to_nearest(rows) for rows in row_chunks(weight)]
        zeros = None if parts[0][2] is None else torch.cat([z for _, _, z in parts])
        return self._finish(torch.cat([q for q, _, _ in parts]), torch.cat([s for _, s, _ in parts]), k, {}, zeros=zeros)

    def quantize_linears(self, names: list[str], weights: list[torch.Tensor], hessian: torch.Tensor,
                         input_amax: torch.Tensor | None = None) -> list[QuantizedLinear]:
        """GPTQ on layers that read the same input (one Hessian), stacked: see qconvert/solvers/gptq.py."""
        cfg = self.config
        k = weights[0].shape[1]
        originals = [w.float() for w in weights]
        res = gptq(torch.cat(originals), hessian, cfg.grid(), cfg.group_size, damp=cfg.damp, act_order=cfg.act_order)
        out, row = [], 0
        for w in originals:
            n = w.shape[0]
            q = pad_columns(res.q[row : row + n], cfg.group_size)
            extra = {"gptq_seconds": round(res.seconds * n / res.q.shape[0], 4), "dead_inputs": res.dead,
                     "solved_with": len(weights)}
            zeros = None if res.zeros is None else res.zeros[row : row + n]
            ql = self._finish(q, res.scales[row : row + n], k, extra, dequantize=True, zeros=zeros)
            # the layer's own output error, relative: ‖(W − Ŵ)X‖² / ‖WX‖² as run (integer scales
            # included), and the same for round-to-nearest (on the same grid)
            ql.info["gptq_loss"] = relative_output_error(w, ql.dequantized, hessian)
            ql.info["rtn_loss"] = relative_output_error(w, self._rtn(w), hessian)
            # the next layers calibrate through the float-scale weights, so that is-w4a8 and
            # w4a8-fs make the same GPTQ decisions and differ only by the integer scales (the
            # two differ by < 2^-a relatively per group; GPTQ's rounding is sensitive enough to
            # such differences to shift perplexity by more than Integer Scale itself does)
            ql.dequantized = _dequantize(q, res.scales[row : row + n], cfg.group_size, k, zeros)
            out.append(ql)
            row += n
        return out

    def _round_to_nearest(self, rows: torch.Tensor):
        """Round-to-nearest with the plain range on this configuration's grid: (q int8 [N, Kp],
        scales [N, G], zero points [N, G] or None for the symmetric grid)."""
        cfg = self.config
        if cfg.symmetric:
            gq = quantize_groups_symmetric(rows, cfg.weight_bits, cfg.group_size)
            return gq.q, gq.scales, None
        return rtn_zero_point(rows, cfg.grid(search=False), cfg.group_size)

    def _rtn(self, w: torch.Tensor) -> torch.Tensor:
        """``_round_to_nearest``, dequantized."""
        q, s, z = self._round_to_nearest(w)
        return _dequantize(q, s, self.config.group_size, w.shape[1], z)

    def _finish(self, q: torch.Tensor, scales: torch.Tensor, k: int, extra: dict,
                dequantize: bool = False, zeros: torch.Tensor | None = None) -> QuantizedLinear:
        """Tensors of the layout from int levels q int8 [N, Kp], float group scales [N, G] and, for
        the asymmetric grid, integer zero points [N, G] (W = s · (q - z))."""
        cfg = self.config
        n = q.shape[0]
        tensors = {"qweight": pack_int4(q), "shape": torch.tensor([n, k], dtype=torch.int64, device="cpu")}
        info = {"shape": [n, k], "bits": cfg.weight_bits, "group_size": cfg.group_size, "base": cfg.base, **extra}
        if cfg.scales == "float":
            tensors["scales"] = scales.half()  # exact: the grids' scales are fp16 numbers
            layout = "w4a16" if cfg.act_bits == 16 else "w4a8-fs"
            if zeros is not None:
                tensors["zeros"] = zeros.to(torch.int8)
                layout = "w4a16-zp"
            info.update(layout=layout)
            deq = _dequantize(q, scales, cfg.group_size, k, zeros) if dequantize else None
            return QuantizedLinear(layout, tensors, info, deq)
        a, s_hat, c, bound = choose_alpha(scales, group_abs_sums(q, cfg.group_size), cfg.max_alpha_log2)
        worst_n = int(bound.argmax())
        tensors.update(
            iscale=s_hat.to(torch.int32),
            cscale=c.float(),
            alpha_log2=torch.tensor([a], dtype=torch.int32, device="cpu"),
        )
        info.update(
            layout="w4a8-is",
            alpha_log2=a,
            bound=int(bound[worst_n]),
            worst_channel=worst_n,
            # an all-zero weight has bound 0: no input can overflow it; report 31 bits
            headroom_bits=round(math.log2(INT32_MAX / max(int(bound[worst_n]), 1)), 3),
        )
        deq = None
        if dequantize:  # the scales the kernel applies: ŝ · c / 2^a
            deq = _dequantize(q, s_hat.double() * c.double()[:, None] / 2.0**a, cfg.group_size, k)
        return QuantizedLinear("w4a8-is", tensors, info, deq)


def _dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int, k: int,
                zeros: torch.Tensor | None = None) -> torch.Tensor:
    n, kp = q.shape
    levels = q.double().reshape(n, -1, group_size)
    if zeros is not None:
        levels = levels - zeros.double()[..., None]
    w = levels * scales.double()[..., None]
    return w.reshape(n, kp)[:, :k].float()

