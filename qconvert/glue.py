"""What the modules that put a model's float glue on kernels share (``qconvert.norms``,
``qconvert.rope``, ``qconvert.mlp``): the device a kernel serves, the transformers modules of known
classes, and a module's forward replaced by a kernel forward (``qconvert.runtime.use_glue_kernels``
sets them all)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import nn


def kernel_device(device: torch.device | str) -> torch.device:
    """``device`` as inputs report it (a CUDA device with its index)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def transformers_modules(model: nn.Module, modeling: dict[str, str]) -> Iterator[nn.Module]:
    """The modules of ``model`` whose class is one of ``modeling``'s names (class name -> the
    transformers module it must come from): a class of the same name elsewhere (remote code) may
    compute something else."""
    for mod in model.modules():
        name = type(mod).__name__
        if name in modeling and type(mod).__module__ == modeling[name]:
            yield mod


def route_forward(mod: nn.Module, forward) -> bool:
    """``mod`` runs ``forward(mod, ...)`` from now on; False if its forward was already replaced."""
    if "forward" in mod.__dict__:
        return False
    # a partial of a module-level function, not a bound method: the module still pickles
    # (torch.save) and a copy's forward is its own
    mod.forward = functools.partial(forward, mod)
    return True

