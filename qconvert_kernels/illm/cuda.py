"""CuPy launcher of the I-LLM kernels (qconvert_kernels/illm_gemm.cu): DI-MatMul, the per-row
requantization, DI-ClippedSoftmax and DI-Norm.  Each equals its function in
``qconvert_kernels.illm.reference`` bit for bit (integers in, integers out; GPU tests in
tests/test_kernels_illm_gpu.py).  The integer model (qconvert/illm_runtime.py) does not call them
yet: ``load(OUT, device="cuda")`` refuses I-LLM outputs in this release.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from qconvert_kernels.w4a8 import cuda as kc
from qconvert_kernels.illm import reference as ri
from qconvert_kernels.compile import kernel_source

SOURCE = Path(__file__).with_name("illm_gemm.cu")
ROW_THREADS = 256


@functools.lru_cache(maxsize=None)
def module(device_index: int = 0):
    cp = kc._cupy()
    with cp.cuda.Device(device_index):
        return cp.RawModule(code=kernel_source(SOURCE), options=("-std=c++17",))


def _launch(name, grid, block, args, dev):
    kc._launch(name, grid, block, args, dev, module)


def illm_matmul(xq: torch.Tensor, qweight: torch.Tensor, wm: torch.Tensor, wk: torch.Tensor, w_bits: int) -> torch.Tensor:
    """DI-MatMul: xq int8 [M, K] x weights (w8: int8 [N, K]; w4: packed uint8 [N, K/2]) -> t int64
    [M, N] = round(acc * wm[n] / 2^(wk[n] - min wk)), as ``ILLMLinear.int_forward``."""
    fn = "illm_matmul"
    m, k = xq.shape
    n = qweight.shape[0]
    kc._require(k % 32 == 0, f"{fn}: K={k} must be a multiple of 32 (the int8 mma K)")
    want = (n, k // 2) if w_bits == 4 else (n, k)
    kc._require(xq.dtype == torch.int8 and tuple(qweight.shape) == want, f"{fn}: xq int8 [M, K] and qweight {want} expected")
    dev = kc._check_cuda(fn, xq, qweight, wm, wk)
    xq, qweight = xq.contiguous(), qweight.contiguous()
    wm, wk = wm.to(torch.int32).contiguous(), wk.to(torch.int32).contiguous()
    kc._check_aligned(fn, xq=xq, qweight=qweight)
    t = torch.empty((m, n), dtype=torch.int64, device=dev)
    if m and n:
        grid = (-(-n // kc.BLOCK_N), -(-m // kc.BLOCK_M))
        _launch(f"illm_matmul_w{w_bits}", grid, (kc.GEMM_THREADS,),
                (kc._ptr(xq), kc._ptr(qweight), kc._ptr(wm), kc._ptr(wk), kc._i32(int(wk.min())), kc._ptr(t),
                 kc._i32(m), kc._i32(n), kc._i32(k)), dev)
    return t


def _row_outputs(rows: int, dev):
    return (torch.empty((rows,), dtype=torch.int64, device=dev), torch.empty((rows,), dtype=torch.int64, device=dev))


def requant_rows(v: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference_illm.quantize_rows for int64 v [rows, n]: (q int8, m int64 [rows], k int64 [rows])."""
    kc._require(v.dim() == 2 and v.dtype == torch.int64 and 0 < qmax <= 127, "requant_rows: int64 [rows, n], qmax <= 127")
    dev = kc._check_cuda("requant_rows", v)
    v = v.contiguous()
    q = torch.empty(v.shape, dtype=torch.int8, device=dev)
    sm, sk = _row_outputs(v.shape[0], dev)
    if v.numel():
        _launch("illm_requant_rows", (v.shape[0],), (ROW_THREADS,),
                (kc._ptr(v), kc._ptr(q), kc._ptr(sm), kc._ptr(sk), kc._i32(v.shape[0]), kc._i32(v.shape[1]), kc._i32(qmax)), dev)
    return q, sm, sk


def softmax(scores: torch.Tensor, valid: torch.Tensor, sm: torch.Tensor, sk: torch.Tensor, clip: float = 15.0) -> torch.Tensor:
    """DI-ClippedSoftmax of int32 scores [rows, T] with a per-row scale sm / 2^sk; row r uses its
    first valid[r] entries (the rest get 0).  Returns int32 probabilities (2^-15 units)."""
    import numpy as np

    kc._require(scores.dim() == 2 and scores.dtype == torch.int32, "softmax: scores must be int32 [rows, T]")
    dev = kc._check_cuda("softmax", scores, valid, sm, sk)
    rows, t = scores.shape
    p = torch.empty_like(scores)
    umax = round(clip * math.log2(math.e) * 2**ri.EXP_F)
    if rows:
        _launch("illm_softmax", (rows,), (ROW_THREADS,),
                (kc._ptr(scores.contiguous()), kc._ptr(valid.to(torch.int32).contiguous()), kc._ptr(sm.long().contiguous()),
                 kc._ptr(sk.long().contiguous()), np.int64(umax), kc._ptr(p), kc._i32(rows), kc._i32(t)), dev)
    return p


def rmsnorm(x: torch.Tensor, gamma: torch.Tensor, gamma_k: int, qmax: int):
    """DI-Norm (reference_illm.di_rmsnorm) of int64 x [rows, H]: (q int8, m int64 [rows], k int64 [rows])."""
    kc._require(x.dim() == 2 and x.dtype == torch.int64 and gamma.shape == (x.shape[1],), "rmsnorm: x int64 [rows, H], gamma [H]")
    dev = kc._check_cuda("rmsnorm", x, gamma)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=dev)
    sm, sk = _row_outputs(x.shape[0], dev)
    if x.numel():
        _launch("illm_rmsnorm", (x.shape[0],), (ROW_THREADS,),
                (kc._ptr(x), kc._ptr(gamma.long().contiguous()), kc._i32(gamma_k), kc._i32(qmax), kc._ptr(q), kc._ptr(sm),
                 kc._ptr(sk), kc._i32(x.shape[0]), kc._i32(x.shape[1])), dev)
    return q, sm, sk
