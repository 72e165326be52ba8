"""CuPy launcher of hadamard.cu: the online Hadamard transform on the GPU.

``transform(x, sign, lp, scale)`` computes ``qconvert_kernels.hadamard.reference.transform``
bit for bit on fp16 / bf16 rows ``x [..., n]`` (n = m << lp, m = sign's order), on torch's
current stream (so it is captured in the decode engine's CUDA graphs like the GEMMs).
Requirements, checked with a ValueError: a CUDA tensor of dtype float16 / bfloat16, n at most
``MAX_ORDER`` (the row lives in shared memory: 4 n bytes), ``sign`` int8 on the same device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qconvert_kernels import launch as _l

SOURCE = Path(__file__).with_name("hadamard.cu")
THREADS = 256  # qh::THREADS
MAX_ORDER = 32768  # 128 KB of shared memory per CTA: within every sm_80+ GPU's opt-in limit
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}


def transform(x: torch.Tensor, sign: torch.Tensor, lp: int, scale: float) -> torch.Tensor:
    fn = "online_hadamard"
    _l.require(x.dtype in _SUFFIX, f"{fn}: x must be float16 or bfloat16, got {x.dtype}")
    m = int(sign.shape[0])
    n = m << lp
    _l.require(x.shape[-1] == n, f"{fn}: order {n} (= {m} x 2^{lp}), but x's last dimension is {x.shape[-1]}")
    _l.require(n <= MAX_ORDER, f"{fn}: order {n} exceeds {MAX_ORDER} (the row must fit in shared memory)")
    _l.require(sign.dtype == torch.int8 and tuple(sign.shape) == (m, m) and sign.is_contiguous(),
               f"{fn}: sign must be a contiguous int8 [m, m]")
    dev = _l.check_cuda(fn, x, sign)
    rows = x.reshape(-1, n).contiguous()
    y = torch.empty_like(rows)
    if rows.shape[0]:
        _l.launch(SOURCE, f"{fn}_{_SUFFIX[x.dtype]}", (rows.shape[0],), (THREADS,),
                  (_l.ptr(rows), _l.ptr(y), _l.ptr(sign), _l.i32(rows.shape[0]), _l.i32(m), _l.i32(lp),
                   np.float32(scale)), dev, shared_mem=4 * n)
    return y.reshape(x.shape)
