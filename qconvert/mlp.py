"""The Llama-family gated MLP activation on one kernel (qconvert_kernels/swiglu) where a model runs
on a GPU.

Eager transformers computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: between the
projections, two small kernels (the SiLU, the product) of a decode step's graph.
``use_swiglu_kernels(model, device)`` has every MLP of the known classes whose activation is SiLU
run ``qconvert_kernels.swiglu.cuda.swiglu`` (one launch) on inputs on ``device`` in float16 /
bfloat16 without grad; anything else keeps transformers' forward.  The projections are called as
transformers calls them, gate first (a joined gate/up GEMM hands both halves out of one launch).
The kernel computes torch's two ops step for step, CUDA's ``expf`` included, so on a GPU a model's
logits do not change (tests/test_kernels_swiglu_gpu.py); on the CPU emulator the exp is a
stand-in (qconvert_kernels/swiglu/reference.py).  On the kernel path the MLP's ``act_fn`` module
is not called: hooks on it, or a replacement of its forward (the ``kernels`` package's
``kernelize``), do not run there; ``swiglu_kernels=False`` keeps them.
"""

from __future__ import annotations

import torch
from torch import nn

from qconvert.glue import kernel_device, route_forward, transformers_modules

# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)), and those whose
# forward is Phi-3's: gate, up = gate_up_proj(x).chunk(2, -1); down_proj(up * activation_fn(gate))
# (both checked against the installed transformers by the tests); the transformers module each
# must come from
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen3MoeMLP", "GraniteMLP", "Olmo2MLP")
JOINED_MLP_CLASSES = ("Phi3MLP",)
MODELING = {name: "transformers.models.{0}.modeling_{0}".format({"Qwen3MoeMLP": "qwen3_moe"}.get(
    name, name.removesuffix("MLP").lower())) for name in MLP_CLASSES + JOINED_MLP_CLASSES}
# activation modules that compute torch's silu (transformers' own, torch's)
SILU = {("transformers.activations", "SiLUActivation"), ("torch.nn.modules.activation", "SiLU")}


def _on_kernel(self, gate: torch.Tensor, up) -> torch.Tensor | None:
    """silu(gate) * up by the kernel where it serves these inputs, else None."""
    if gate.device == self.swiglu_kernel_device and isinstance(up, torch.Tensor) and up.device == gate.device \
            and not torch.is_grad_enabled():
        from qconvert_kernels.swiglu import cuda as ks

        if ks.problem(gate, up) is None:
            return ks.swiglu(gate, up)
    return None


def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate = self.gate_proj(x)
    up = self.up_proj(x)
    act = _on_kernel(self, gate, up)
    return self.down_proj(act if act is not None else self.act_fn(gate) * up)


def _joined_kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
    # Phi-3: one GEMM gives gate and up side by side; the kernel reads the two halves' strided rows
    # (no copy).  up * silu(gate) and silu(gate) * up are one float32 product: the same bits
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    act = _on_kernel(self, gate, up)
    return self.down_proj(act if act is not None else up * self.activation_fn(gate))


def use_swiglu_kernels(model: nn.Module, device: torch.device | str) -> int:
    """Every MLP of the known classes in ``model`` whose ``act_fn`` is SiLU runs its activation on
    the swiglu kernel for inputs on ``device`` (a GPU; the CPU only under the kernel emulator).
    Returns how many MLPs were set (again: none new)."""
    device = kernel_device(device)
    count = 0
    for mod in transformers_modules(model, MODELING):
        joined = type(mod).__name__ in JOINED_MLP_CLASSES
        act = getattr(mod, "activation_fn" if joined else "act_fn", None)
        projections = ("gate_up_proj", "down_proj") if joined else ("gate_proj", "up_proj", "down_proj")
        if (type(act).__module__, type(act).__name__) not in SILU \
                or not all(isinstance(getattr(mod, p, None), nn.Module) for p in projections):
            continue
        mod.swiglu_kernel_device = device
        count += route_forward(mod, _joined_kernel_forward if joined else _kernel_forward)
    return count
