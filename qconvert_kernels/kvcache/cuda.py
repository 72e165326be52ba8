"""CuPy launcher of kvcache.cu: a decoder block's new keys and values into its static KV cache on
the GPU, one launch.

``kv_write(k, v, cols, k_cache, v_cache)`` does what ``reference.kv_write`` does (two
``index_copy_`` along the column dimension), in place, on torch's current stream, with no host
read of ``cols``: a decode engine's CUDA graph captures it.  ``k [B, H, T, Dk]``, ``v [B, H, T,
Dv]``, ``k_cache [B, H, L, Dk]``, ``v_cache [B, H, L, Dv]``, all float16 or all bfloat16, any
strides (a source whose last dimension is not contiguous is copied first; the caches' must be);
``cols`` int64 [T], each in 0 .. L - 1 (a column outside is left unwritten).  The caches may not
share memory with a source or with each other, nor hold an element twice (an expanded view): the
kernel's pointers are ``__restrict__``, its sources read through non-coherent loads.  Checked
with a ValueError: CUDA tensors (or CPU tensors under the emulator's launch hook) on one device,
the shapes above.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qconvert_kernels import launch as _l

SOURCE = Path(__file__).with_name("kvcache.cu")
THREADS = 128  # a CTA's threads where a head allows (several heads a CTA)
MAX_THREADS = 1024  # kv::MAX_THREADS: one head's elements at most
MAX_GRID_YZ = 65535  # gridDim.y (head groups) and gridDim.z (batch rows)
DTYPES = (torch.float16, torch.bfloat16)


def heads_per_cta(width: int) -> tuple[int, int]:
    """The CTA shape (W, H'): a thread per element of a head, as many heads as fit in THREADS
    threads (at least one)."""
    return width, max(1, THREADS // width)


def _strides(t: torch.Tensor) -> tuple:
    """b, head, column strides of a [B, H, T or L, D] tensor, as the kernel's int64 arguments."""
    return tuple(np.int64(s) for s in t.stride()[:3])


def problem(k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (the launcher's ValueError), or None: dtypes,
    shapes, layouts and the grid's limits (not the device, not the values of ``cols``).  The decode
    engine asks it before choosing the kernel over ``index_copy_``."""
    fn = "kv_write"
    if k.dtype not in DTYPES:
        return f"{fn}: k must be float16 or bfloat16, got {k.dtype}"
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != k.dtype:
            return f"{fn}: {name} must be {k.dtype} like k, got {t.dtype}"
    if cols.dtype != torch.int64 or cols.dim() != 1:
        return f"{fn}: cols must be int64 [T], got {cols.dtype} {tuple(cols.shape)}"
    if any(t.dim() != 4 for t in (k, v, k_cache, v_cache)):
        return f"{fn}: k, v and the caches must be [B, H, T or L, D]"
    b, h, t_len, dk = k.shape
    dv = v.shape[3]
    if tuple(v.shape[:3]) != (b, h, t_len) or cols.shape[0] != t_len:
        return f"{fn}: v {tuple(v.shape)} and cols {tuple(cols.shape)} must match k's {b} rows, {h} heads, {t_len} tokens"
    length = k_cache.shape[2]
    if tuple(k_cache.shape) != (b, h, length, dk) or tuple(v_cache.shape) != (b, h, length, dv):
        return (f"{fn}: the caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be [{b}, {h}, L, {dk}] "
                f"and [{b}, {h}, L, {dv}]")
    if any(c.shape[3] > 1 and c.stride(3) != 1 for c in (k_cache, v_cache)):
        return f"{fn}: the caches' last dimension must be contiguous"
    width = max(dk, dv)
    if not 0 < width <= MAX_THREADS:
        return f"{fn}: head sizes up to {MAX_THREADS}, got {dk} and {dv}"
    if -(-h // heads_per_cta(width)[1]) > MAX_GRID_YZ or b > MAX_GRID_YZ or t_len >= 2**31 or h >= 2**31:
        return f"{fn}: {b} rows of {t_len} tokens and {h} heads exceed the grid; write fewer at once"
    return None


def kv_write(k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> None:
    fn = "kv_write"
    why = problem(k, v, cols, k_cache, v_cache)
    _l.require(why is None, why)
    dev = _l.check_cuda(fn, k, v, cols, k_cache, v_cache)
    k, v = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    cols = cols.contiguous()
    _l.check_writable(fn, k_cache=k_cache, v_cache=v_cache)  # no two threads write one element
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        # the kernel reads its sources through const __restrict__ (non-coherent) loads
        _l.require(all(c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (k, v, cols)),
                   f"{fn}: {name} shares memory with k, v or cols; write from tensors of their own")
    b, h, t_len, dk = k.shape
    dv = v.shape[3]
    block = heads_per_cta(max(dk, dv))
    if b * t_len * h:
        _l.launch(SOURCE, fn, (t_len, -(-h // block[1]), b), block,
                  (_l.ptr(k), _l.ptr(v), _l.ptr(cols), _l.ptr(k_cache), _l.ptr(v_cache), _l.i32(h), _l.i32(dk),
                   _l.i32(dv), np.int64(k_cache.shape[2]), *_strides(k), *_strides(v), *_strides(k_cache),
                   *_strides(v_cache)), dev)
