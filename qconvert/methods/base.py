"""What every method plugin is and hands the pipeline.

A method is code that chooses quantized weights (a *scheme* is the data that picks a method and
its parameters; a *layout*, qconvert/layouts/, is how the result is stored and run).  A plugin
subclasses ``Method``; the pipeline calls its hooks in this order:

1. ``__init__(params)``: ``config_class(**params)`` validates them (an unknown key fails with
   the list of the known ones), before any file is read;
2. ``describe()``: the JSON recorded as ``quantization_config.config`` in OUT;
3. ``needs_calibration``: whether the calibrated block walk runs (qconvert/block_walk.py);
4. without calibration, ``quantize_linear(name, weight)`` once per target linear, in file order;
5. with calibration, per decoder block in order:
   a. ``prepare_block(prefix, block, feed)``: may rewrite the block in place before it is observed
      (I-LLM folds its smoothing); returns the non-linear parameters it changed, which are written
      instead of the source's;
   b. ``quantize_linears(names, weights, hessian, input_amax)`` once per group of linears that read
      one input, in the order the data flows (q/k/v, o, gate/up, down; MoE experts likewise);
   c. between stages the block runs as quantized: each ``QuantizedLinear.dequantized`` weight, its
      input passed through ``QuantizedLinear.activation`` or, when that is None,
      ``activation_fake_quant``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qconvert.errors import QConvertError


@dataclass
class QuantizedLinear:
    """One quantized linear layer.

    layout  : the layout (qconvert/layouts/) that stores and runs it
    tensors : suffix -> tensor, written as ``f"{module_name}.{suffix}"``
    info    : a JSON-able report row (shape, bits, group size, α, headroom, ...)
    dequantized : the float weight [N, K] the layer computes with, for calibration to run the
              quantized block (not written); None from ``quantize_linear``
    activation : the run-time activation quantizer of this layer, in float (x -> what the
              layer computes with), for calibration; None: the method's
              ``activation_fake_quant``, the same for every layer
    """

    layout: str
    tensors: dict[str, torch.Tensor]
    info: dict
    dequantized: torch.Tensor | None = None
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None


class Method:
    """Base of the method plugins (see the module docstring for the hook order)."""

    name: str = ""
    config_class: type = object
    wants_input_amax = False  # the pipeline passes each group's per-channel max |x| to quantize_linears

    def __init__(self, params: dict):
        self.config = build_config(self.config_class, self.name, params)

    @property
    def needs_calibration(self) -> bool:
        return getattr(self.config, "base", "rtn") == "gptq"

    def describe(self) -> dict:
        raise NotImplementedError

    def check_config(self, config) -> None:
        """Refuse, before any work, a model this method's OUT could not run (default: any model
        qconvert reads will do)."""

    def activation_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """What the runtime does to a linear's input, in float (identity: weight-only)."""
        return x

    def quantize_linear(self, name: str, weight: torch.Tensor) -> QuantizedLinear:
        raise QConvertError(f"{self.name} calibrates; {name} cannot be quantized without data: run quantize with "
                            "--calib (c4 / wikitext2 / file / self)")

    def quantize_linears(self, names: list[str], weights: list[torch.Tensor], hessian: torch.Tensor,
                         input_amax: torch.Tensor | None = None) -> list[QuantizedLinear]:
        raise NotImplementedError

    def prepare_block(self, prefix: str, block, feed) -> dict[str, torch.Tensor]:
        return {}


def relative_weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖W - Ŵ‖_F / ‖W‖_F, rounded to 6 digits (0 for an all-zero W)."""
    den = float(w.norm())
    return round(float((w - w_hat).norm()) / den, 6) if den > 0 else 0.0


def build_config(config_cls, method: str, params: dict):
    """``config_cls(**params)``, an unknown parameter refused with the list of the known ones."""
    try:
        return config_cls(**params)
    except TypeError as e:
        allowed = ", ".join(config_cls.__dataclass_fields__)
        raise QConvertError(f"{method}: {e}; allowed parameters: {allowed}") from e


def check_solver_params(method: str, base, damp, clip_min, act_order=True) -> None:
    """The checks every GPTQ-based config shares: ``base``, ``damp``, ``clip_min``, ``act_order``."""
    if base not in ("rtn", "gptq"):
        raise QConvertError(f"{method}: base={base!r} must be 'rtn' or 'gptq'")
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and 0 < damp <= 1):
        raise QConvertError(f"{method}: damp={damp!r} must be in (0, 1]; 0.01 is the default")
    if not (isinstance(clip_min, (int, float)) and not isinstance(clip_min, bool) and 0.3 <= clip_min <= 1):
        raise QConvertError(f"{method}: clip_min={clip_min!r} must be in [0.3, 1]; 1 turns the search off")
    if not isinstance(act_order, bool):
        raise QConvertError(f"{method}: act_order must be true or false")
