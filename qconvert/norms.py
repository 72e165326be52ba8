"""The Llama-family RMSNorm on one kernel (qconvert_kernels/norm) where a model runs on a GPU.

Eager transformers computes each RMSNorm in eight torch ops (two casts, square, mean, add,
rsqrt, two products): two norms a decoder block, sixteen small kernels of a decode step's graph.
``use_norm_kernels(model, device)`` has every RMSNorm of the known classes run ``rms_norm`` (one
launch) on inputs on ``device`` in the weight's dtype (float16 / bfloat16); anything else (another
device or dtype) keeps the transformers forward.  The kernel equals
``qconvert_kernels.norm.reference.rms_norm`` bit for bit, which differs from transformers' formula
only in the order of the mean's sum and in rsqrt's rounding (float32, before the output's rounding
to fp16 / bf16): measured, a unit in the last place in about one output in a thousand or fewer
(tests/test_kernels_norm.py, weights in [-0.5, 1.5)).
"""

from __future__ import annotations

import torch
from torch import nn

from qconvert.glue import kernel_device, route_forward

# RMSNorm classes whose forward is w * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype) with
# ``weight`` and ``variance_epsilon`` (checked against the installed transformers by the tests)
NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm",
                "Phi3RMSNorm", "GraniteRMSNorm")


def _kernel_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if hidden_states.device == self.norm_kernel_device and hidden_states.dtype == w.dtype \
            and w.dtype in (torch.float16, torch.bfloat16) and not torch.is_grad_enabled():
        from qconvert_kernels.norm import cuda as kn

        return kn.rms_norm(hidden_states, w, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def use_norm_kernels(model: nn.Module, device: torch.device | str) -> int:
    """Every known RMSNorm of ``model`` runs the norm kernel on inputs on ``device`` (a GPU; the CPU
    only under the kernel emulator).  Returns how many norms were set (again: none new)."""
    device = kernel_device(device)
    count = 0
    for mod in model.modules():
        if type(mod).__name__ in NORM_CLASSES and isinstance(getattr(mod, "weight", None), torch.Tensor) \
                and hasattr(mod, "variance_epsilon"):
            mod.norm_kernel_device = device
            count += route_forward(mod, _kernel_forward)
    return count
