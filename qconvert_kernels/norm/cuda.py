"""CuPy launcher of norm.cu: RMSNorm of fp16 / bf16 rows on the GPU.

``rms_norm(x, weight, eps)`` computes ``qconvert_kernels.norm.reference.rms_norm`` bit for bit on
``x [..., n]`` with ``weight [n]`` of x's dtype, on torch's current stream (so a decode engine's
CUDA graph captures it).  Requirements, checked with a ValueError: CUDA tensors (or CPU tensors
under the emulator's launch hook) of dtype float16 / bfloat16, one dtype, ``weight`` of n values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qconvert_kernels import launch as _l

SOURCE = Path(__file__).with_name("norm.cu")
THREADS = 256  # qn::THREADS
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    fn = "rms_norm"
    _l.require(x.dtype in _SUFFIX, f"{fn}: x must be float16 or bfloat16, got {x.dtype}")
    _l.require(weight.dtype == x.dtype, f"{fn}: weight must be {x.dtype} like x, got {weight.dtype}")
    n = x.shape[-1]
    _l.require(weight.dim() == 1 and weight.shape[0] == n, f"{fn}: weight must be [{n}], got {tuple(weight.shape)}")
    _l.require(0 < n <= 2**31 - THREADS, f"{fn}: rows of {n} values; the kernel takes 1 to 2^31 - {THREADS}")
    dev = _l.check_cuda(fn, x, weight)
    rows = x.reshape(-1, n).contiguous()
    _l.require(rows.shape[0] < 2**31, f"{fn}: {rows.shape[0]} rows exceed the grid; run fewer at once")
    w = weight.contiguous()
    y = torch.empty_like(rows)
    if rows.shape[0]:
        _l.launch(SOURCE, f"{fn}_{_SUFFIX[x.dtype]}", (rows.shape[0],), (THREADS,),
                  (_l.ptr(rows), _l.ptr(w), _l.ptr(y), _l.i32(rows.shape[0]), _l.i32(n), np.float32(eps)), dev)
    return y.reshape(x.shape)
