"""The definition of swiglu.cu's gated activation, in torch (each step rounded where the kernel's is):

    gate and up [..., I], both fp16 or both bf16:
      s   = dtype(g / (1 + exp(-g)))      float32: exp rounded to float32, then the sum and the
                                          quotient each correctly rounded to float32
      out = dtype(s * u)                  float32 (exact for two dtype values), rounded to the dtype

That is torch's ``silu(gate) * up`` (transformers' ``act_fn(gate_proj(x)) * up_proj(x)``) written
out: torch's silu computes ``x / (1 + exp(-x))`` in float32 and rounds once to the dtype, its
product of two dtype tensors computes in float32 and rounds once.  The one step no CPU reproduces
is the float32 exp: on a GPU it is CUDA's ``expf`` (the kernel's and torch's, equal bit for bit:
tests/test_kernels_swiglu_gpu.py); here ``exp_f32`` stands in for it (float64 exp rounded to float32,
the correctly rounded value but for rare double roundings), in the reference and in the emulator
alike.  Against torch's CPU ``silu(gate) * up`` the reference is measured equal on every fp16
and bf16 gate value and on 262,144 random pairs of each dtype (tests/test_kernels_swiglu.py).  A
NaN output (a NaN input, or silu(-inf) = -inf / inf) is NaN here, in torch and on the GPU, its
bit pattern not necessarily the same.
"""

from __future__ import annotations

import numpy as np
import torch


def exp_f32(x: np.ndarray) -> np.ndarray:
    """float32 exp of float32 values: float64 exp, rounded to float32 (overflow to inf)."""
    with np.errstate(over="ignore"):
        return np.exp(x.astype(np.float64)).astype(np.float32)


def silu_f32(x: np.ndarray) -> np.ndarray:
    """x / (1 + exp(-x)) of float32 values: exp as ``exp_f32``, the sum rounded to float32, the
    quotient computed in float64 and rounded once to float32 (the correctly rounded float32
    quotient, as the kernel computes it)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        d = (np.float32(1) + exp_f32(-x)).astype(np.float32)
        return (x.astype(np.float64) / d.astype(np.float64)).astype(np.float32)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """swiglu.cu's output: silu(gate) * up in the inputs' dtype, contiguous."""
    dtype = gate.dtype
    s = torch.from_numpy(silu_f32(gate.float().numpy())).to(dtype)
    return (s.float() * up.float()).to(dtype).contiguous()
