"""The Llama-family rotary position embedding on one kernel (qconvert_kernels/rope) where a model
runs on a GPU.

Eager transformers rotates a block's q and k in ten torch ops (``apply_rotary_pos_emb``: two
products, a negation, a concatenation and a sum for each): ten small kernels of a decode step's
graph.  ``use_rope_kernels(model, device)`` has the attention layers of the known classes run
``qconvert_kernels.rope.cuda.rope`` (one launch) instead, on inputs on ``device`` in float16 /
bfloat16 without grad; anything else keeps transformers' function.  The kernel equals
transformers' formula bit for bit (each op rounds once to the dtype, in the same order), and its
outputs take the strides eager torch gives them, so a model's logits do not change at all
(tests/test_kernels_rope.py: a tiny Llama and an is-w4a8 decode step, emulated).

How it is wired: the attention forward calls its modeling module's global
``apply_rotary_pos_emb``; that global is replaced, once per module, by a ``RopeDispatch`` that
calls the original unless the call comes from inside an opted-in layer's forward (a context
variable, set by the forward ``use_rope_kernels`` gives the layer).  So the replacement is
process-wide but changes nothing for any other model or call.
"""

from __future__ import annotations

import contextvars
import functools
import sys

import torch
from torch import nn

from qconvert.glue import kernel_device, route_forward, transformers_modules

# attention classes whose forward rotates with their module's apply_rotary_pos_emb(q, k, cos, sin),
# the Llama formula (checked against the installed transformers by the tests), and the transformers
# module each must come from: a class of the same name elsewhere (remote code) may rotate otherwise
ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "MixtralAttention", "Qwen2Attention", "Qwen3Attention",
                     "Qwen3MoeAttention")
MODELING = {name: "transformers.models.{0}.modeling_{0}".format({"Qwen3MoeAttention": "qwen3_moe"}.get(
    name, name.removesuffix("Attention").lower())) for name in ATTENTION_CLASSES}
_DEVICE: contextvars.ContextVar = contextvars.ContextVar("qconvert_rope_device", default=None)


class RopeDispatch:
    """A modeling module's ``apply_rotary_pos_emb``: the rope kernel inside an opted-in attention
    layer's forward, ``original`` everywhere else.

    Where the ``kernels`` package is installed, transformers' function is a ``Func`` module and
    each attention layer keeps a private ``Func`` that unpickling rebuilds as
    ``type(modeling.apply_rotary_pos_emb)()``; the dispatcher of such a module is an instance of a
    subclass whose ``_rebuilds`` is the original's type, and constructing that subclass without an
    argument returns a fresh original (what the unpickled layer had before)."""

    _rebuilds = None

    def __new__(cls, original=None, module: str = ""):
        if original is None and cls._rebuilds is not None:
            return cls._rebuilds()
        return super().__new__(cls)

    def __init__(self, original, module: str = ""):
        self.original, self.module = original, module

    # one per modeling module, named by it: a copy is the same object, a pickle names the global
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return _module_global, (self.module,)

    @classmethod
    def wrap(cls, original, module: str) -> "RopeDispatch":
        """The dispatcher of ``module``'s (a module name) ``original`` function."""
        rebuilds = type(original) if isinstance(original, nn.Module) else None
        return type(cls.__name__, (cls,), {"_rebuilds": rebuilds, "__module__": __name__})(original, module)

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        device = _DEVICE.get()
        if device is not None and not args and kwargs.get("unsqueeze_dim", 1) == 1 and set(kwargs) <= {"unsqueeze_dim"} \
                and _kernel_takes(q, k, cos, sin, device):
            from qconvert_kernels.rope import cuda as kr

            q_strides, k_strides = _eager_strides(self.original, *(_signature(t) for t in (q, k, cos, sin)))
            out = (torch.empty_strided(q.shape, q_strides, dtype=q.dtype, device=q.device),
                   torch.empty_strided(k.shape, k_strides, dtype=k.dtype, device=k.device))
            return kr.rope(q, k, cos, sin, out=out)
        return self.original(q, k, cos, sin, *args, **kwargs)


def _module_global(module: str) -> "RopeDispatch":
    import importlib

    return importlib.import_module(module).apply_rotary_pos_emb


def _kernel_takes(q, k, cos, sin, device: torch.device) -> bool:
    """The call is one the kernel computes exactly as transformers would, within the launcher's
    limits: four tensors on ``device``, no grad, and nothing ``cuda.problem`` refuses (one kernel
    dtype, [B, H, T, D] q and k, [B or 1, T, D] tables, D even); anything else goes to
    transformers' function."""
    from qconvert_kernels.rope import cuda as kr

    if torch.is_grad_enabled() or not all(isinstance(t, torch.Tensor) and t.device == device for t in (q, k, cos, sin)):
        return False
    return kr.problem(q, k, cos, sin) is None


def _signature(t: torch.Tensor) -> tuple:
    return t.dtype, tuple(t.shape), tuple(t.stride())


@functools.lru_cache(maxsize=512)
def _eager_strides(original, *signatures) -> tuple[tuple, tuple]:
    """The strides eager torch gives transformers' rotated q and k for inputs of these dtypes,
    shapes and strides: the original function run once on meta tensors (no data, no device work)."""
    meta = [torch.empty_strided(shape, stride, dtype=dtype, device="meta") for dtype, shape, stride in signatures]
    q_embed, k_embed = original(*meta)
    return tuple(q_embed.stride()), tuple(k_embed.stride())


def _attention_forward(self, *args, **kwargs):
    token = _DEVICE.set(self.rope_kernel_device)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _DEVICE.reset(token)


def use_rope_kernels(model: nn.Module, device: torch.device | str) -> int:
    """Every attention layer of the known classes in ``model`` rotates q and k on the rope kernel
    for inputs on ``device`` (a GPU; the CPU only under the kernel emulator).  Returns how many
    layers were set (again: none new)."""
    device = kernel_device(device)
    count = 0
    for mod in transformers_modules(model, MODELING):
        modeling = sys.modules[type(mod).__module__]
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is None:
            continue
        if not isinstance(original, RopeDispatch):
            modeling.apply_rotary_pos_emb = RopeDispatch.wrap(original, modeling.__name__)
        mod.rope_kernel_device = device
        count += route_forward(mod, _attention_forward)
    return count
