"""CuPy launcher of rope.cu: the rotary position embedding of q and k on the GPU, one launch.

``rope(q, k, cos, sin, out=None)`` computes ``qconvert_kernels.rope.reference.rope`` bit for bit
(transformers' ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``) on torch's current stream, so a
decode engine's CUDA graph captures it.  ``q [B, Hq, T, D]``, ``k [B, Hk, T, D]``, ``cos`` and
``sin [B or 1, T, D]``, all float16 or all bfloat16, D even; any strides (a last dimension that is
not contiguous is copied first).  ``out``: the two output tensors (shapes of q and k, any strides
with a contiguous last dimension, memory of their own: the kernel reads its inputs through
``const __restrict__`` loads), or None for new ones laid out ``[B, T, H, D]`` in memory (a
projection's own order), returned as ``[B, H, T, D]`` views.  Checked with a ValueError:
CUDA tensors (or CPU tensors under the emulator's launch hook) on one device, the shapes above.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qconvert_kernels import launch as _l

SOURCE = Path(__file__).with_name("rope.cu")
THREADS = 128  # a CTA's threads where a head's pairs allow (several heads a CTA)
MAX_THREADS = 1024  # qr::MAX_THREADS: one head's pairs at most (D <= 2048)
MAX_GRID_YZ = 65535  # gridDim.y (head groups) and gridDim.z (batch rows)
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}


def heads_per_cta(half: int) -> tuple[int, int]:
    """The CTA shape (h, H'): a thread per pair of a head, as many heads as fit in THREADS threads
    (at least one)."""
    return half, max(1, THREADS // half)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _bht(t: torch.Tensor) -> tuple:
    """b, head, t strides of a [B, H, T, D] tensor, as the kernel's int64 arguments."""
    return tuple(np.int64(s) for s in t.stride()[:3])


def problem(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (the launcher's ValueError), or None: dtypes,
    shapes and the grid's limits (not the device).  ``qconvert.rope`` asks it before choosing the
    kernel over transformers' function."""
    fn = "rope"
    if q.dtype not in _SUFFIX:
        return f"{fn}: q must be float16 or bfloat16, got {q.dtype}"
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype != q.dtype:
            return f"{fn}: {name} must be {q.dtype} like q, got {t.dtype}"
    if q.dim() != 4 or k.dim() != 4:
        return f"{fn}: q and k must be [B, H, T, D], got {tuple(q.shape)} and {tuple(k.shape)}"
    b, hq, t_len, d = q.shape
    if k.shape[0] != b or k.shape[2:] != q.shape[2:]:
        return f"{fn}: k {tuple(k.shape)} must share q's batch, tokens and head size ({b}, {t_len}, {d})"
    if d % 2 or not 0 < d <= 2 * MAX_THREADS:
        return f"{fn}: the head size must be even (rotate_half halves it) and at most {2 * MAX_THREADS}, got {d}"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (t_len, d):
            return f"{fn}: {name} must be [{b} or 1, {t_len}, {d}], got {tuple(t.shape)}"
    heads = hq + k.shape[1]
    if heads >= 2**31 or -(-heads // heads_per_cta(d // 2)[1]) > MAX_GRID_YZ:
        return f"{fn}: {heads} heads exceed the grid"
    if b > MAX_GRID_YZ or t_len >= 2**31:
        return f"{fn}: {b} rows of {t_len} tokens exceed the grid; run fewer at once"
    return None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    fn = "rope"
    why = problem(q, k, cos, sin)
    _l.require(why is None, why)
    b, hq, t_len, d = q.shape
    hk = k.shape[1]
    block = heads_per_cta(d // 2)
    groups = -(-(hq + hk) // block[1])
    dev = _l.check_cuda(fn, q, k, cos, sin)
    q, k, cos, sin = (_last_contiguous(t) for t in (q, k, cos, sin))
    if out is None:
        qo = torch.empty(b, t_len, hq, d, dtype=q.dtype, device=dev).transpose(1, 2)
        ko = torch.empty(b, t_len, hk, d, dtype=q.dtype, device=dev).transpose(1, 2)
    else:
        qo, ko = out
        for name, o, like in (("out[0]", qo, q), ("out[1]", ko, k)):
            _l.require(o.shape == like.shape and o.dtype == q.dtype and (o.shape[-1] <= 1 or o.stride(-1) == 1),
                       f"{fn}: {name} must be {tuple(like.shape)} {q.dtype} with a contiguous last dimension")
            # the kernel reads its inputs through const __restrict__ (non-coherent) loads
            _l.require(all(o.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (q, k, cos, sin)),
                       f"{fn}: {name} shares memory with an input; give new output tensors")
        _l.check_writable(fn, **{"out[0]": qo, "out[1]": ko})  # each element its own, the two apart
        _l.check_cuda(fn, q, qo, ko)
    if b * t_len and hq + hk:
        cb = 0 if cos.shape[0] == 1 else cos.stride(0)
        sb = 0 if sin.shape[0] == 1 else sin.stride(0)
        _l.launch(SOURCE, f"{fn}_{_SUFFIX[q.dtype]}", (t_len, groups, b), block,
                  (_l.ptr(q), _l.ptr(k), _l.ptr(cos), _l.ptr(sin), _l.ptr(qo), _l.ptr(ko), _l.i32(hq), _l.i32(hk),
                   _l.i32(d // 2), *_bht(q), *_bht(k), *_bht(qo), *_bht(ko),
                   np.int64(cb), np.int64(cos.stride(1)), np.int64(sb), np.int64(sin.stride(1))), dev)
    return qo, ko
