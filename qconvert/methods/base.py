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
    """

    layout: str
    tensors: dict[str, torch.Tensor]
    info: dict
