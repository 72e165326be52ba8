"""W8A8 int8 (layout ``w8a8``): int8 weights per output channel, dynamic per-token int8 activations.

The scheme serving engines run on int8 hardware (vLLM's ``CompressedTensorsW8A8Int8``, on GPUs
and, through oneDNN, on CPUs), so a ``w8a8`` OUT exports to compressed-tensors ``int-quantized``
as it is.  Weights: symmetric on [-127, 127] with one float32 scale per output channel, chosen by
the shared GPTQ (one group spanning K, act-order, the diag-H-weighted range search down to
``clip_min``) or by round-to-nearest; activations: per token, symmetric int8, at run time, the
same quantizer as the W4A8 layouts (calibration runs the next layers through it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qconvert.methods.base import Method, QuantizedLinear, check_solver_params, relative_weight_error
from qconvert.solvers.gptq import gptq, relative_output_error
from qconvert.solvers.grids import IntGrid, clip_factors
from qconvert_kernels.w4a8.reference import ACT_QMAX, quantize_per_token_int8


@dataclass(frozen=True)
class Int8Config:
    base: str = "gptq"  # "gptq" (calibrated) or "rtn"
    clip_min: float = 1.0  # range search of each row's scale: 1.0, 0.975, ... clip_min (1: off)
    damp: float = 0.01
    act_order: bool = True

    def __post_init__(self):
        check_solver_params("int8", self.base, self.damp, self.clip_min, self.act_order)

    def grid(self) -> IntGrid:
        return IntGrid(8, clip_factors(self.clip_min), narrow=True)


class Int8Method(Method):
    """Method plugin ``int8`` (preset w8a8)."""

    name = "int8"
    config_class = Int8Config

    def describe(self) -> dict:
        return {**asdict(self.config),
                "weights": {"bits": 8, "symmetric": True, "granularity": "per-channel", "range": [-127, 127]},
                "activations": {"bits": 8, "symmetric": True, "granularity": "per-token", "dynamic": True,
                                "qmax": ACT_QMAX}}

    def activation_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The runtime's per-token int8 round trip, in float: xq · t."""
        shape = x.shape
        xq, t = quantize_per_token_int8(x.reshape(-1, shape[-1]))
        return (xq.float() * t[:, None]).reshape(shape).to(x.dtype)

    def quantize_linear(self, name: str, weight: torch.Tensor) -> QuantizedLinear:
        w = weight.float()
        grid = IntGrid(8, narrow=True)
        s = grid.scales(w)
        return self._finish(w, grid.quantize(w, s[:, None]).to(torch.int8), s, {})

    def quantize_linears(self, names: list[str], weights: list[torch.Tensor], hessian: torch.Tensor,
                         input_amax: torch.Tensor | None = None) -> list[QuantizedLinear]:
        """GPTQ per output channel, layers that read one input stacked."""
        cfg = self.config
        originals = [w.float() for w in weights]
        stacked = torch.cat(originals)
        res = gptq(stacked, hessian, cfg.grid(), stacked.shape[1], damp=cfg.damp, act_order=cfg.act_order)
        out, row = [], 0
        for w in originals:
            n = w.shape[0]
            ql = self._finish(w, res.q[row: row + n], res.scales[row: row + n, 0],
                              {"gptq_seconds": round(res.seconds * n / stacked.shape[0], 4), "dead_inputs": res.dead,
                               "solved_with": len(weights)})
            rtn = self.quantize_linear("", w)
            ql.info.update(gptq_loss=relative_output_error(w, ql.dequantized, hessian),
                           rtn_loss=relative_output_error(w, _dequantize(rtn.tensors), hessian))
            out.append(ql)
            row += n
        return out

    def _finish(self, w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, extra: dict) -> QuantizedLinear:
        n, k = w.shape
        tensors = {"qweight": q.contiguous(), "shape": torch.tensor([n, k], dtype=torch.int64, device="cpu"),
                   "wscale": s.float().contiguous()}
        deq = _dequantize(tensors)
        info = {"layout": "w8a8", "shape": [n, k], "bits": 8, "base": self.config.base,
                "weight_error": relative_weight_error(w, deq), **extra}
        return QuantizedLinear("w8a8", tensors, info, deq)


def _dequantize(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """q · s per row, in float64 rounded once to float32."""
    return (tensors["qweight"].double() * tensors["wscale"].double()[:, None]).float()
