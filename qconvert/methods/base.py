"""What every method plugin hands the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qconvert.errors import QConvertError


@dataclass
class QuantizedLinear:
    """One quantized linear layer.

    layout  : the runtime module that runs it (``qconvert.runtime.LAYOUTS``) and the tensor
              set docs/format.md specifies for it
    tensors : suffix -> tensor, written as ``f"{module_name}.{suffix}"``
    info    : a JSON-able report row (shape, bits, group size, α, headroom, ...)
    dequantized : the float weight [N, K] the layer computes with, for calibration to run the
              quantized block (not written); None when nobody asked for it
    activation : the run-time activation quantizer of this layer, in float (x -> what the
              layer computes with), for calibration; None: the method's
              ``activation_fake_quant``, the same for every layer
    """

    layout: str
    tensors: dict[str, torch.Tensor]
    info: dict
    dequantized: torch.Tensor | None = None
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None


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
