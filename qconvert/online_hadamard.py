"""The online Hadamard transform before the MLP's output linear (``--rotate hadamard+online``).

QuaRot's fourth rotation: ``down_proj`` reads the product ``act(gate(x)) * up(x)``, which no
offline rotation reaches (it is made inside the MLP), and whose channels carry the outliers that
keep 4-bit activations from working.  The run time applies an orthogonal ``Q = (A (x) H_p) /
sqrt(n)`` to that input (``n`` the intermediate size, ``n = m * p``, ``p = 2^lp``, A an integer
Hadamard matrix of order m, m = 1 when n is a power of two), and the weight is stored as
``W Q`` (folded offline by ``qconvert.solvers.rotation.RotatedSource``), so that the layer
computes ``(x Q)(W Q)^T = x W^T``: the same function, with a flat input to quantize.

The transform's arithmetic is qconvert_kernels/hadamard/reference.py (float32, exact order);
on CUDA tensors the kernel hadamard.cu computes it bit for bit.  Where it runs:

  * a loaded OUT (``qconvert.load``) and ``RotatedSource.load_model``: the listed linears'
    ``forward`` applies it first (``attach``), so forward hooks still see the linear's input;
  * calibration (``qconvert.block_walk``): a forward pre-hook placed before every other hook
    (``pre_hook``), so that Hessians, outlier statistics and the activation quantizers all see
    the transformed input.

m is the smallest of 1, 12, 20, 28, 36, ... (an order qconvert builds: Sylvester and Paley I/II,
``qconvert.solvers.hadamard``) such that n / m is a power of two; SmolLM2's 1536 = 12 x 128,
Llama-3-8B's 14336 = 28 x 512.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
from torch import nn

from qconvert.errors import OnlineUnsupported, QConvertError
from qconvert.solvers.hadamard import _elementary, _paley_kind, hadamard

KIND = "hadamard"


def split_order(n: int) -> tuple[int, int] | None:
    """(m, lp) with n = m * 2^lp and a Hadamard matrix of order m known to qconvert, m smallest;
    None when there is none."""
    if n < 1:
        return None
    lp = (n & -n).bit_length() - 1  # the largest power of two dividing n
    for k in range(lp, -1, -1):  # m = n / 2^k grows as k falls
        m = n >> k
        if m in (1, 2) or _paley_kind(m) is not None:  # Sylvester, or Paley I / II (orders 0 mod 4)
            return m, k
    return None


class OnlineHadamard:
    """The transform of order n: ``sign`` (A, int8 [m, m]), ``lp``, ``scale`` (float32 1/sqrt(n))."""

    def __init__(self, n: int, where: str = "the MLP's intermediate size"):
        split = split_order(n)
        if split is None:
            raise OnlineUnsupported(f"no online Hadamard transform of order {n} ({where}): qconvert builds m x 2^k "
                                    "with m = 1, 12, 20, 28, 36, ...; use --rotate hadamard (offline only)")
        self.n, (self.m, self.lp) = n, split
        a = _elementary(self.m) if self.m > 1 else torch.ones(1, 1, dtype=torch.float64)
        self.sign = a.to(torch.int8).contiguous()
        self.scale = float(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32))
        self._on_device: dict[tuple, torch.Tensor] = {}

    def describe(self) -> dict:
        return {"kind": KIND, "order": self.n, "m": self.m, "p": 1 << self.lp}

    def factors(self) -> list[torch.Tensor]:
        """Q's Kronecker factors, orthonormal float64 (``qconvert.solvers.rotation.Rotation``)."""
        a = self.sign.to(torch.float64) / math.sqrt(self.m)
        return [a, hadamard(1 << self.lp)] if self.lp else [a]

    def sign_on(self, device: torch.device, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        """A as ``dtype`` on ``device``, copied there once, not per call (a copy from the host inside
        a step would wait for it, and a CUDA graph cannot capture it)."""
        key = (torch.device(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = self.sign.to(device=key[0], dtype=dtype)
        return self._on_device[key]

    def table_on(self, device: torch.device) -> torch.Tensor:
        """A in the float32 form the CUDA kernel reads (``qconvert_kernels.hadamard.cuda.sign_table``),
        made on ``device`` once, as ``sign_on``."""
        key = (torch.device(device), "table")
        if key not in self._on_device:
            from qconvert_kernels.hadamard import cuda as kh

            self._on_device[key] = kh.sign_table(self.sign_on(device))
        return self._on_device[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from qconvert_kernels.hadamard import cuda as kh

            return kh.transform(x, self.sign_on(x.device), self.lp, self.scale, self.table_on(x.device))
        from qconvert_kernels.hadamard import reference

        return reference.transform(x, self.sign, self.lp, self.scale)


def attach(module: nn.Module, transform: OnlineHadamard) -> None:
    """``module`` (a linear reading n channels) applies ``transform`` to its input first."""
    if getattr(module, "online_transform", None) is not None:
        raise QConvertError("an online transform is already attached to this layer; load the model again")
    inner = module.forward
    module.online_transform = transform
    module.forward = types.MethodType(lambda self, x, *a, **k: inner(transform(x), *a, **k), module)


def has_online(module: nn.Module) -> bool:
    """Whether ``module``'s input is transformed first: by ``attach`` (a loaded OUT) or ``pre_hook``
    (calibration)."""
    return getattr(module, "online_transform", None) is not None or hasattr(module, "online_transform_on")


def attach_all(model: nn.Module, names: list[str], transform: OnlineHadamard) -> None:
    for name in names:
        attach(model.get_submodule(name), transform)


def pre_hook(module: nn.Module, transform: OnlineHadamard):
    """A forward pre-hook applying ``transform``, run before any hook registered later or earlier;
    ``suspended(module)`` turns it off (for an input already transformed).  Returns the handle."""
    module.online_transform_on = True

    def hook(mod, args):
        if not mod.online_transform_on:
            return None
        return (transform(args[0]), *args[1:])

    return module.register_forward_pre_hook(hook, prepend=True)


@contextlib.contextmanager
def suspended(module: nn.Module):
    """``module``'s pre-hook (``pre_hook``) off inside the block, if it has one."""
    had = getattr(module, "online_transform_on", None)
    if had is None:
        yield
        return
    module.online_transform_on = False
    try:
        yield
    finally:
        module.online_transform_on = had
