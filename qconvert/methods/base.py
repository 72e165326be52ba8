"""What every method plugin hands the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedLinear:
    """One quantized linear layer.

    layout  : the runtime module that runs it (``qconvert.runtime.LAYOUTS``) and the tensor
              set docs/format.md specifies for it
    tensors : suffix -> tensor, written as ``f"{module_name}.{suffix}"``
    info    : a JSON-able report row (shape, bits, group size, α, headroom, ...)
    dequantized : the float weight [N, K] the layer computes with, for calibration to run the
              quantized block (not written); None when nobody asked for it
    """

    layout: str
    tensors: dict[str, torch.Tensor]
    info: dict
    dequantized: torch.Tensor | None = None
