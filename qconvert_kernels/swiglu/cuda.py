"""CuPy launcher of swiglu.cu: silu(gate) * up on the GPU, one launch.

``swiglu(gate, up, out=None)`` computes torch's ``silu(gate) * up`` bit for bit (see
reference.py: on a GPU the kernel and torch share CUDA's expf), on torch's current stream, so a
decode engine's CUDA graph captures it.  ``gate`` and ``up [..., I]`` of one shape, both float16
or both bfloat16; rows may be strided (the two halves of a joined gate/up GEMM's output) but each
row's elements contiguous (otherwise the input is copied first).  ``out``: a tensor of that shape
and dtype, rows strided as the inputs may be, memory of its own (the kernel reads its inputs
through ``const __restrict__`` loads), or None for a new contiguous one.  Checked with a
ValueError: CUDA tensors (or CPU tensors under the emulator's launch hook) on one device, the
shapes above.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qconvert_kernels import launch as _l

SOURCE = Path(__file__).with_name("swiglu.cu")
THREADS = 256  # qs::THREADS: the columns a CTA takes
MAX_GRID_Y = 65535  # gridDim.y: column chunks of a row
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as [M, I] with unit column stride (a view, no copy), or None where no such view exists."""
    if t.dim() == 0:
        return None
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1]) if t.dim() != 2 else t
    except RuntimeError:  # rows that do not flatten to one stride
        return None


def problem(gate: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (the launcher's ValueError), or None: dtypes,
    shapes and the grid's limit (not the device, not the layout: a layout the kernel cannot read
    is copied first).  ``qconvert.mlp`` asks it before choosing the kernel over transformers'
    two ops."""
    fn = "swiglu"
    if gate.dtype not in _SUFFIX:
        return f"{fn}: gate must be float16 or bfloat16, got {gate.dtype}"
    if up.dtype != gate.dtype:
        return f"{fn}: up must be {gate.dtype} like gate, got {up.dtype}"
    if gate.shape != up.shape or gate.dim() == 0:
        return f"{fn}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape [..., I]"
    cols = gate.shape[-1]
    rows = gate.numel() // cols if cols else 0
    if -(-cols // THREADS) > MAX_GRID_Y or rows >= 2**31:
        return f"{fn}: {rows} rows of {cols} exceed the grid; run fewer at once"
    return None


def swiglu(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    fn = "swiglu"
    why = problem(gate, up)
    _l.require(why is None, why)
    dev = _l.check_cuda(fn, gate, up)
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=dev)
    _l.require(out.shape == gate.shape and out.dtype == gate.dtype,
               f"{fn}: out must be {tuple(gate.shape)} {gate.dtype}, got {tuple(out.shape)} {out.dtype}")
    _l.check_cuda(fn, gate, out)
    if gate.numel() == 0:
        return out
    g2, u2 = _rows(gate), _rows(up)
    g2 = g2 if g2 is not None else gate.contiguous().view(-1, gate.shape[-1])
    u2 = u2 if u2 is not None else up.contiguous().view(-1, up.shape[-1])
    o2 = _rows(out)
    _l.require(o2 is not None, f"{fn}: out's rows must each be contiguous and flatten to one row stride")
    _l.check_writable(fn, out=o2)
    # the kernel reads its inputs through const __restrict__ (non-coherent) loads
    _l.require(all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (g2, u2)),
               f"{fn}: out shares memory with an input; give a new output tensor")
    rows, cols = g2.shape
    if rows * cols:
        _l.launch(SOURCE, f"{fn}_{_SUFFIX[gate.dtype]}", (rows, -(-cols // THREADS)), (THREADS,),
                  (_l.ptr(g2), _l.ptr(u2), _l.ptr(o2), _l.i32(cols), np.int64(g2.stride(0)), np.int64(u2.stride(0)),
                   np.int64(o2.stride(0))), dev)
    return out
