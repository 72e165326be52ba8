"""CuPy launcher of the I-LLM kernels (qconvert_kernels/illm/illm_gemm.cu): DI-MatMul, the per-row
requantization, DI-ClippedSoftmax and DI-Norm.  Each equals its function in
``qconvert_kernels.illm.reference`` bit for bit (integers in, integers out; GPU tests in
tests/test_kernels_illm_gpu.py).  The integer model (qconvert/layouts/illm.py) calls
``illm_matmul``, ``requant_rows`` and ``rmsnorm`` on a GPU (``IntegerLlama.use_kernels``); its
softmax takes int64 scores, so ``softmax`` here is for int32 scores of one scale per row.

Every launcher here checks shapes and dtypes on the host (metadata only), never reads a device
value on the host (graph-capturable: DI-MatMul's exponent alignment min(wk) is computed on the
device and passed by pointer), makes its inputs contiguous, allocates contiguous outputs, and
keeps every temporary it passes by pointer alive until the launch has been issued.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qconvert_kernels import launch as _l
from qconvert_kernels.illm import reference as ri

SOURCE = Path(__file__).with_name("illm_gemm.cu")
ROW_THREADS = 256
BLOCK_M = BLOCK_N = 64  # DI-MatMul CTA tile (quik::BM, quik::BN)
GEMM_THREADS = 128
MATMUL_MAX_M = 65535 * BLOCK_M  # DI-MatMul's grid.y (one CTA row per BLOCK_M rows) is at most 65535


def module(device_index: int = 0):
    """The ``cupy.RawModule`` of illm_gemm.cu for the device (launch.build: NVRTC, no FTZ)."""
    return _l.module(SOURCE, device_index)


def _launch(name, grid, block, args, dev):
    _l.launch(SOURCE, name, grid, block, args, dev)


def _rows_vector(fn: str, what: str, v: torch.Tensor, rows: int, dtypes) -> None:
    _l.require(v.dim() == 1 and v.shape[0] == rows, f"{fn}: {what} must be [rows] = [{rows}], got {tuple(v.shape)}")
    _l.require(v.dtype in dtypes, f"{fn}: {what} must be one of {[str(d) for d in dtypes]}, got {v.dtype}")


_INT = (torch.int32, torch.int64)


def illm_matmul(xq: torch.Tensor, qweight: torch.Tensor, wm: torch.Tensor, wk: torch.Tensor, w_bits: int,
                kmin: torch.Tensor | None = None) -> torch.Tensor:
    """DI-MatMul: xq int8 [M, K] x weights (w8: int8 [N, K]; w4: packed uint8 [N, K/2]) -> t int64
    [M, N] = round(acc * wm[n] / 2^(wk[n] - min wk)), as ``ILLMLinear.int_forward``.

    ``kmin`` (int [1] on the device) may be given precomputed (a layer constant); by default it is
    ``wk.min()`` computed on the device: the host never reads it."""
    fn = "illm_matmul"
    _l.require(w_bits in (4, 8), f"{fn}: w_bits must be 4 or 8, got {w_bits}")
    _l.require(xq.dim() == 2 and qweight.dim() == 2, f"{fn}: xq [M, K] and qweight [N, K or K/2] must be 2-D")
    m, k = xq.shape
    n = qweight.shape[0]
    _l.require(k % 32 == 0, f"{fn}: K={k} must be a multiple of 32 (the int8 mma K)")
    _l.require(m <= MATMUL_MAX_M, f"{fn}: M={m} rows exceed the grid's {MATMUL_MAX_M}; run fewer tokens at once")
    want = (n, k // 2) if w_bits == 4 else (n, k)
    wdt = torch.uint8 if w_bits == 4 else torch.int8
    _l.require(xq.dtype == torch.int8 and tuple(qweight.shape) == want and qweight.dtype == wdt,
               f"{fn}: xq int8 [M, K] and qweight {wdt} {want} expected, got {xq.dtype} {tuple(xq.shape)}, "
               f"{qweight.dtype} {tuple(qweight.shape)}")
    _rows_vector(fn, "wm", wm, n, _INT)
    _rows_vector(fn, "wk", wk, n, _INT)
    dev = _l.check_cuda(fn, xq, qweight, wm, wk)
    xq, qweight = xq.contiguous(), qweight.contiguous()
    wm, wk = wm.to(torch.int32).contiguous(), wk.to(torch.int32).contiguous()
    if kmin is None:
        kmin_t = wk.min().reshape(1) if n else torch.zeros(1, dtype=torch.int32, device=dev)
    else:
        _l.require(kmin.numel() == 1, f"{fn}: kmin must hold one value, got {tuple(kmin.shape)}")
        kmin_t = kmin.reshape(1).to(device=dev, dtype=torch.int32)
    kmin_t = kmin_t.to(torch.int32).contiguous()
    _l.check_aligned(fn, xq=xq, qweight=qweight)
    t = torch.empty((m, n), dtype=torch.int64, device=dev)
    if m and n:
        grid = (-(-n // BLOCK_N), -(-m // BLOCK_M))
        _launch(f"illm_matmul_w{w_bits}", grid, (GEMM_THREADS,),
                (_l.ptr(xq), _l.ptr(qweight), _l.ptr(wm), _l.ptr(wk), _l.ptr(kmin_t), _l.ptr(t),
                 _l.i32(m), _l.i32(n), _l.i32(k)), dev)
    return t


def _row_outputs(rows: int, dev):
    return (torch.empty((rows,), dtype=torch.int64, device=dev), torch.empty((rows,), dtype=torch.int64, device=dev))


def _check_clip(fn: str, clip: int) -> None:
    _l.require(isinstance(clip, int) and ri.CLIP_ONE // 2 <= clip <= ri.CLIP_ONE,
               f"{fn}: clip must be an integer c * 2^16 in [2^15, 2^16] (reference.clip_int), got {clip!r}")


def requant_rows(v: torch.Tensor, qmax: int, clip: int = ri.CLIP_ONE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference_illm.quantize_rows for int64 v [rows, n]: (q int8, m int64 [rows], k int64 [rows])."""
    _l.require(v.dim() == 2 and v.dtype == torch.int64 and 0 < qmax <= 127, "requant_rows: int64 [rows, n], 0 < qmax <= 127")
    _check_clip("requant_rows", clip)
    dev = _l.check_cuda("requant_rows", v)
    v = v.contiguous()
    q = torch.empty(v.shape, dtype=torch.int8, device=dev)
    sm, sk = _row_outputs(v.shape[0], dev)
    if v.numel():
        _launch("illm_requant_rows", (v.shape[0],), (ROW_THREADS,),
                (_l.ptr(v), _l.ptr(q), _l.ptr(sm), _l.ptr(sk), _l.i32(v.shape[0]), _l.i32(v.shape[1]), _l.i32(qmax),
                 _l.i32(clip)), dev)
    return q, sm, sk


def softmax(scores: torch.Tensor, valid: torch.Tensor, sm: torch.Tensor, sk: torch.Tensor, clip: float = 15.0) -> torch.Tensor:
    """DI-ClippedSoftmax of int32 scores [rows, T] with a per-row scale sm / 2^sk; row r uses its
    first valid[r] entries (the rest get 0; the kernel clamps valid[r] to [0, T]).  Returns int32
    probabilities [rows, T] (2^-15 units), contiguous whatever the input's strides."""
    import numpy as np

    fn = "softmax"
    _l.require(scores.dim() == 2 and scores.dtype == torch.int32, f"{fn}: scores must be int32 [rows, T], got {scores.dtype} {tuple(scores.shape)}")
    rows, t = scores.shape
    _rows_vector(fn, "valid", valid, rows, _INT)
    _rows_vector(fn, "sm", sm, rows, _INT)
    _rows_vector(fn, "sk", sk, rows, _INT)
    _l.require(clip > 0 and math.isfinite(clip), f"{fn}: clip must be a positive number, got {clip}")
    dev = _l.check_cuda(fn, scores, valid, sm, sk)
    # every operand passed by pointer is a named local: alive until the launch is issued
    scores_c = scores.contiguous()
    valid_c = valid.to(torch.int32).contiguous()
    sm_c, sk_c = sm.to(torch.int64).contiguous(), sk.to(torch.int64).contiguous()
    p = torch.empty((rows, t), dtype=torch.int32, device=dev)  # row-major, as the kernel writes it
    umax = round(clip * math.log2(math.e) * 2**ri.EXP_F)
    if rows:
        _launch("illm_softmax", (rows,), (ROW_THREADS,),
                (_l.ptr(scores_c), _l.ptr(valid_c), _l.ptr(sm_c), _l.ptr(sk_c), np.int64(umax), _l.ptr(p), _l.i32(rows), _l.i32(t)), dev)
    return p


def rmsnorm(x: torch.Tensor, gamma: torch.Tensor, gamma_k: int, qmax: int, clip: int = ri.CLIP_ONE):
    """DI-Norm (reference_illm.di_rmsnorm) of int64 x [rows, H]: (q int8, m int64 [rows], k int64 [rows])."""
    fn = "rmsnorm"
    _l.require(x.dim() == 2 and x.dtype == torch.int64 and gamma.shape == (x.shape[1],), f"{fn}: x int64 [rows, H], gamma [H]")
    _l.require(gamma.dtype in _INT, f"{fn}: gamma must be an integer tensor, got {gamma.dtype}")
    _l.require(0 < qmax <= 127, f"{fn}: 0 < qmax <= 127, got {qmax}")
    _check_clip(fn, clip)
    dev = _l.check_cuda(fn, x, gamma)
    x = x.contiguous()
    gamma_c = gamma.to(torch.int64).contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=dev)
    sm, sk = _row_outputs(x.shape[0], dev)
    if x.numel():
        _launch("illm_rmsnorm", (x.shape[0],), (ROW_THREADS,),
                (_l.ptr(x), _l.ptr(gamma_c), _l.i32(gamma_k), _l.i32(qmax), _l.ptr(q), _l.ptr(sm),
                 _l.ptr(sk), _l.i32(x.shape[0]), _l.i32(x.shape[1]), _l.i32(clip)), dev)
    return q, sm, sk
