"""CuPy launcher of hadamard.cu: the online Hadamard transform on the GPU.

``transform(x, sign, lp, scale)`` computes ``qconvert_kernels.hadamard.reference.transform``
bit for bit on fp16 / bf16 rows ``x [..., n]`` (n = m << lp, m = sign's order), on torch's
current stream (so it is captured in the decode engine's CUDA graphs like the GEMMs).
Requirements, checked with a ValueError: a CUDA tensor of dtype float16 / bfloat16, n at most
``MAX_ORDER`` (the row lives in shared memory: 4 n bytes), ``sign`` int8 on the same device.
``table``: ``sign_table(sign)``, the float32 form the kernel reads, made once by the caller
(``OnlineHadamard``); without it each call makes it (two small torch ops).

Grid: one CTA per row and column group, ``ctas_per_row``: rows x C CTAs with C a power of two,
at most A's chunk count (R = 8 columns each), and enough CTAs for about two per SM when the rows
alone are fewer (batch 1: 4 CTAs per row of 14336 = 28 x 512).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qconvert_kernels import launch as _l

SOURCE = Path(__file__).with_name("hadamard.cu")
THREADS = 256  # qh::THREADS
R = 8  # qh::R: A's columns per chunk
MAX_ORDER = 32768  # 128 KB of shared memory per CTA: within every sm_80+ GPU's opt-in limit
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}


def sign_table(sign: torch.Tensor) -> torch.Tensor:
    """A (int8 [m, m], +-1) as the kernel reads it: float32 [m, mp], mp = m rounded up to R,
    the padding columns zero, on sign's device."""
    m = int(sign.shape[0])
    table = torch.zeros(m, -(-m // R) * R, dtype=torch.float32, device=sign.device)
    table[:, :m] = sign
    return table


def ctas_per_row(rows: int, m: int, sms: int) -> int:
    """C: the largest power of two at most A's chunk count and at most what brings rows x C to
    about two CTAs per SM (1 once the rows alone are that many)."""
    chunks = -(-m // R)
    want = max(1, -(-2 * sms // max(rows, 1)))
    c = 1
    while c * 2 <= min(chunks, want):
        c *= 2
    return c


def transform(x: torch.Tensor, sign: torch.Tensor, lp: int, scale: float, table: torch.Tensor | None = None) -> torch.Tensor:
    fn = "online_hadamard"
    _l.require(x.dtype in _SUFFIX, f"{fn}: x must be float16 or bfloat16, got {x.dtype}")
    m = int(sign.shape[0])
    n = m << lp
    _l.require(x.shape[-1] == n, f"{fn}: order {n} (= {m} x 2^{lp}), but x's last dimension is {x.shape[-1]}")
    _l.require(n <= MAX_ORDER, f"{fn}: order {n} exceeds {MAX_ORDER} (the row must fit in shared memory)")
    _l.require(sign.dtype == torch.int8 and tuple(sign.shape) == (m, m) and sign.is_contiguous(),
               f"{fn}: sign must be a contiguous int8 [m, m]")
    if table is None:
        table = sign_table(sign)
    mp = -(-m // R) * R
    _l.require(table.dtype == torch.float32 and tuple(table.shape) == (m, mp) and table.is_contiguous(),
               f"{fn}: table must be sign_table(sign), a contiguous float32 [{m}, {mp}]")
    _l.require(table.data_ptr() % 16 == 0, f"{fn}: table must be 16-byte aligned (the kernel reads it 16 bytes at a time)")
    dev = _l.check_cuda(fn, x, sign, table)
    rows = x.reshape(-1, n).contiguous()
    if rows.data_ptr() % 16:  # the kernel reads eight inputs at once (a view at an odd offset)
        rows = rows.clone()
    y = torch.empty_like(rows)
    if rows.shape[0]:
        sms = (_l.emulated_sm_count() if _l.current_hook() is not None
               else _l.sm_count(dev.index if dev.index is not None else torch.cuda.current_device()))
        grid = (rows.shape[0], ctas_per_row(rows.shape[0], m, sms))
        _l.launch(SOURCE, f"{fn}_{_SUFFIX[x.dtype]}", grid, (THREADS,),
                  (_l.ptr(rows), _l.ptr(y), _l.ptr(table), _l.i32(rows.shape[0]), _l.i32(m), _l.i32(lp),
                   np.float32(scale)), dev, shared_mem=4 * n)
    return y.reshape(x.shape)
