"""CuPy launcher of the I-LLM kernels (qconvert_kernels/illm/illm_gemm.cu): DI-MatMul, the per-row
requantizations (int8, with scale products folded in; q, k and v through RoPE), DI-ClippedSoftmax,
DI-Norm, a block's integer glue fused per row (SwiGLU, the residual add with the next DI-Norm,
the online Hadamard transform), attention (one query row per CTA) and its heads' requantization
for o_proj.  Each equals its function in ``qconvert_kernels.illm.reference`` bit for bit
(integers in, integers out; GPU tests in tests/test_kernels_illm_gpu.py).  The integer model
(qconvert/layouts/illm.py) calls all but ``softmax`` on a GPU (``IntegerLlama.use_kernels``); its
softmax takes int64 scores, so ``softmax`` here is for int32 scores of one scale per row.

Every launcher here checks shapes and dtypes on the host (metadata only), never reads a device
value on the host (graph-capturable: DI-MatMul's exponent alignment min(wk) is computed on the
device and passed by pointer), makes its inputs contiguous (but reads a joined DI-MatMul's column
slices in place), allocates contiguous outputs, and keeps every temporary it passes by pointer
alive until the launch has been issued.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qconvert_kernels import launch as _l
from qconvert_kernels.illm import reference as ri
# the GEMV runs quik_mainloop.cuh's main loop, hence QUIK's launch shape
from qconvert_kernels.quik.cuda import GV_COLS_PER_CTA as GEMV_COLS_PER_CTA
from qconvert_kernels.quik.cuda import GV_ROWS as GEMV_ROWS
from qconvert_kernels.quik.cuda import GV_THREADS as GEMV_THREADS

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


MATMUL_KERNELS = ("tile", "gemv", "int_mm")


def default_matmul(m: int, n: int, w_bits: int) -> str:
    """The DI-MatMul kernel ``illm_matmul`` takes by default: the GEMV at M <= GEMV_ROWS; above, w8
    with N a multiple of 8 on torch._int_mm (cuBLASLt's int8 GEMM; the weights as stored are the
    column-major operand it takes, so no copy) and ``illm_dyadic_rows``; else the 64 x 64 tile kernel."""
    if m <= GEMV_ROWS:
        return "gemv"
    return "int_mm" if w_bits == 8 and n % 8 == 0 else "tile"


def illm_matmul(xq: torch.Tensor, qweight: torch.Tensor, wm: torch.Tensor, wk: torch.Tensor, w_bits: int,
                kmin: torch.Tensor | None = None, xk: torch.Tensor | None = None, splits: tuple[int, ...] | None = None,
                kernel: str | None = None):
    """DI-MatMul: xq int8 [M, K] x weights (w8: int8 [N, K]; w4: packed uint8 [N, K/2]) -> t int64
    [M, N] = round(acc * wm[n] / 2^(wk[n] - min wk)), as ``ILLMLinear.int_forward``.

    ``kmin`` (int [1] on the device) may be given precomputed (a layer constant); by default it is
    ``wk.min()`` computed on the device: the host never reads it.  With ``xk`` (int [M], the rows'
    scale exponents) the kernel also writes t's, xk + kmin, and returns (t, tk int64 [M]).

    ``splits``: the column counts of up to three sibling linears joined along N (their weights,
    wm and wk concatenated; they read the same xq): each segment of columns is aligned to its own
    layer's kmin (``kmin`` int [segments], by default each segment's min on the device), so every
    segment's t equals its layer's own, and tk is [segments, M], one row of exponents per layer.

    ``kernel``: "gemv" (M <= 8, the default there: a warp per two output columns, dp4a,
    ``illm_gemv_w8`` / ``illm_gemv_w4``), "tile" (64 x 64 tensor-core tiles, any M) or "int_mm" (w8:
    torch._int_mm's int32 product, then ``illm_dyadic_rows``); the same t.  ``default_matmul`` picks."""
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
    segs = (n,) if splits is None else tuple(splits)
    _l.require(splits is None or (1 <= len(segs) <= 3 and all(isinstance(c, int) and c > 0 for c in segs)
                                  and sum(segs) == n),
               f"{fn}: splits must be 1 to 3 positive column counts adding up to N={n}, got {splits!r}")
    dev = _l.check_cuda(fn, xq, qweight, wm, wk)
    xq, qweight = xq.contiguous(), qweight.contiguous()
    wm, wk = wm.to(torch.int32).contiguous(), wk.to(torch.int32).contiguous()
    if kmin is None:
        kmin_t = (torch.stack([w.min() for w in wk.split(segs)]) if n else torch.zeros(1, dtype=torch.int32, device=dev))
    else:
        _l.require(kmin.numel() == len(segs), f"{fn}: kmin must hold one value per segment ({len(segs)}), "
                   f"got {tuple(kmin.shape)}")
        kmin_t = kmin.reshape(-1).to(device=dev, dtype=torch.int32)
    kmin_t = kmin_t.to(torch.int32).contiguous()
    _l.check_aligned(fn, xq=xq, qweight=qweight)
    if xk is not None:
        _rows_vector(fn, "xk", xk, m, _INT)
        _l.check_cuda(fn, xq, xk)
        xk = xk.to(torch.int64).contiguous()
    t = torch.empty((m, n), dtype=torch.int64, device=dev)
    tk = None if xk is None else torch.empty((len(segs), m) if splits is not None else (m,), dtype=torch.int64, device=dev)
    bounds = [sum(segs[:i + 1]) for i in range(len(segs) - 1)] + [n] * (3 - len(segs))  # n1, n2
    kernel = kernel or default_matmul(m, n, w_bits)
    _l.require(kernel in MATMUL_KERNELS and (kernel != "gemv" or m <= GEMV_ROWS) and (kernel != "int_mm" or w_bits == 8),
               f"{fn}: kernel {kernel!r} must be one of {MATMUL_KERNELS} (gemv: at most {GEMV_ROWS} rows; int_mm: w8)")
    args = (_l.ptr(xq), _l.ptr(qweight), _l.ptr(wm), _l.ptr(wk), _l.ptr(kmin_t), _l.ptr(t), _l.ptr(xk), _l.ptr(tk),
            _l.i32(m), _l.i32(n), _l.i32(k), _l.i32(bounds[0]), _l.i32(bounds[1]))
    if m and n and kernel == "int_mm":
        acc = ri.int_mm_product(xq, qweight, fn)  # int32 [M', N'], M' >= M, N' >= N
        _launch("illm_dyadic_rows", (m,), (ROW_THREADS,),
                (_l.ptr(acc), _l.ptr(wm), _l.ptr(wk), _l.ptr(kmin_t), _l.ptr(t), _l.ptr(xk), _l.ptr(tk), _l.i32(m), _l.i32(n),
                 _l.i32(acc.stride(0)), _l.i32(bounds[0]), _l.i32(bounds[1])), dev)
    elif m and n and kernel == "gemv":
        _launch(f"illm_gemv_w{w_bits}", (-(-n // GEMV_COLS_PER_CTA),), (GEMV_THREADS,), args, dev)
    elif m and n:
        _launch(f"illm_matmul_w{w_bits}", (-(-n // BLOCK_N), -(-m // BLOCK_M)), (GEMM_THREADS,), args, dev)
    elif tk is not None:  # no CTA runs: t's exponents on the device all the same
        tk = (xk + kmin_t[:, None]).reshape(tk.shape)
    return t if xk is None else (t, tk)


def _row_outputs(rows: int, dev):
    return (torch.empty((rows,), dtype=torch.int64, device=dev), torch.empty((rows,), dtype=torch.int64, device=dev))


def _check_clip(fn: str, clip: int) -> None:
    _l.require(isinstance(clip, int) and ri.CLIP_ONE // 2 <= clip <= ri.CLIP_ONE,
               f"{fn}: clip must be an integer c * 2^16 in [2^15, 2^16] (reference.clip_int), got {clip!r}")


def requant_rows(v: torch.Tensor, qmax: int, clip: int = ri.CLIP_ONE, fm: torch.Tensor | None = None,
                 fk: torch.Tensor | None = None, cm: torch.Tensor | None = None,
                 ck: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.quantize_rows for int64 v [rows, n]: (q int8, m int64 [rows], k int64 [rows]); with
    ``fm``, ``fk`` (int [folds, rows], per-row dyadics) the scale returned is the row's ratio times
    each fold in turn (``Dyadic.__mul__``, left to right), then, with ``cm``, ``ck`` (one int64 each
    on the device), times that one dyadic."""
    fn = "requant_rows"
    _l.require(v.dim() == 2 and v.dtype == torch.int64 and 0 < qmax <= 127, f"{fn}: int64 [rows, n], 0 < qmax <= 127")
    _check_clip(fn, clip)
    rows = v.shape[0]
    _l.require((fm is None) == (fk is None), f"{fn}: give both fm and fk, or neither")
    if fm is not None:
        _l.require(fm.dim() == 2 and fm.shape[1] == rows and fk.shape == fm.shape and fm.dtype in _INT and fk.dtype in _INT,
                   f"{fn}: fm and fk must be integers [folds, rows] = [folds, {rows}], got {fm.dtype} "
                   f"{tuple(fm.shape)} and {fk.dtype} {tuple(fk.shape)}")
    _l.require((cm is None) == (ck is None), f"{fn}: give both cm and ck, or neither")
    if cm is not None:
        _l.require(cm.numel() == 1 and ck.numel() == 1 and cm.dtype == ck.dtype == torch.int64,
                   f"{fn}: cm and ck must be one int64 each, got {cm.dtype} {tuple(cm.shape)} and {ck.dtype} {tuple(ck.shape)}")
    dev = _l.check_cuda(fn, v, *(() if fm is None else (fm, fk)), *(() if cm is None else (cm, ck)))
    v = v.contiguous()
    fm_c, fk_c = (None, None) if fm is None else (fm.to(torch.int64).contiguous(), fk.to(torch.int64).contiguous())
    q = torch.empty(v.shape, dtype=torch.int8, device=dev)
    sm, sk = _row_outputs(rows, dev)
    if v.numel():
        _launch("illm_requant_rows", (rows,), (ROW_THREADS,),
                (_l.ptr(v), _l.ptr(q), _l.ptr(sm), _l.ptr(sk), _l.i32(rows), _l.i32(v.shape[1]), _l.i32(qmax),
                 _l.i32(clip), _l.ptr(fm_c), _l.ptr(fk_c), _l.i32(0 if fm is None else fm.shape[0]), _l.ptr(cm),
                 _l.ptr(ck)), dev)
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
    umax = ri.exp_umax(clip)
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


def _row_scale(fn: str, what: str, m: torch.Tensor, k: torch.Tensor, rows: int):
    """A per-row dyadic (m, k [rows], any integer dtype) as the kernels read it: int64, contiguous."""
    _rows_vector(fn, f"{what} m", m, rows, _INT)
    _rows_vector(fn, f"{what} k", k, rows, _INT)
    return m.to(torch.int64).contiguous(), k.to(torch.int64).contiguous()


def _int64_rows(fn: str, what: str, v: torch.Tensor, shape=None, strided: bool = False) -> torch.Tensor:
    """v checked as int64 [rows, n] (of ``shape``), contiguous; with ``strided`` rows may stay apart
    (a column slice of a wider tensor, as a joined DI-MatMul's output is read): only a row itself
    must be dense, the row stride (``v.stride(0)``) is what the kernel is passed."""
    _l.require(v.dim() == 2 and v.dtype == torch.int64 and (shape is None or tuple(v.shape) == tuple(shape)),
               f"{fn}: {what} must be int64 [rows, n]" + (f" = {list(shape)}" if shape is not None else "")
               + f", got {v.dtype} {tuple(v.shape)}")
    if strided and (v.stride(1) == 1 or v.shape[1] <= 1) and v.shape[1] <= v.stride(0) < 2**31:
        return v
    return v.contiguous()


def _ld(v: torch.Tensor) -> int:
    """The row stride the kernel reads v [rows, n] with (``_int64_rows(strided=True)``'s result)."""
    return v.stride(0) if v.shape[0] > 1 else v.shape[1]


def _scaled_pair(fn: str, first: tuple, second: tuple, strided: bool = False):
    """Two int64 [rows, n] operands of one shape, each with a per-row dyadic, as (name, v, m, k, scale
    name): each as (v, m, k) the kernel reads (int64, contiguous; with ``strided`` both rows one
    stride apart, made contiguous where theirs differ), and their one CUDA device."""
    v1 = _int64_rows(fn, first[0], first[1], strided=strided)
    v2 = _int64_rows(fn, second[0], second[1], v1.shape, strided=strided)
    if strided and _ld(v1) != _ld(v2):
        v1, v2 = v1.contiguous(), v2.contiguous()
    rows = v1.shape[0]
    s1, s2 = _row_scale(fn, first[4], first[2], first[3], rows), _row_scale(fn, second[4], second[2], second[3], rows)
    dev = _l.check_cuda(fn, v1, v2, *s1, *s2)
    return (v1, *s1), (v2, *s2), dev


def _check_wide_qmax(fn: str, qmax: int) -> None:
    _l.require(isinstance(qmax, int) and 0 < qmax <= ri.RESIDUAL_QMAX, f"{fn}: 0 < qmax <= 2^20 - 1, got {qmax!r}")


def _fold(fn: str, what: str, m: torch.Tensor | None, k: torch.Tensor | None, rows: int):
    """An optional per-row dyadic (both m and k [rows], or neither) as the kernels read it."""
    _l.require((m is None) == (k is None), f"{fn}: give both {what} m and k, or neither")
    return (None, None) if m is None else _row_scale(fn, what, m, k, rows)


def rope_requant(t: torch.Tensor, head_dim: int, qmax: int, per_head: bool, pos: torch.Tensor | None = None,
                 cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, fm: torch.Tensor | None = None,
                 fk: torch.Tensor | None = None, om: torch.Tensor | None = None, ok: torch.Tensor | None = None,
                 into: tuple | None = None):
    """reference.rope_requant on the kernel, for a token's projection t int64 [rows, L] (L = heads *
    head_dim; its rows may be a joined DI-MatMul's columns, read in place): with ``pos`` (int [rows], each row's position) and the model's tables ``cos``,
    ``sin`` int64 [positions, head_dim / 2], RoPE of each head by the rows ``cos[pos]``, ``sin[pos]``
    (every pos must be below ``positions``: a device value, not checked here); (fm, fk) the 16-bit
    ratio's fold and (om, ok) the output scale's, per-row dyadics [rows].  Returns (q int8 [rows, L],
    m, k int64 [rows, G]), G = heads with ``per_head``, else 1.

    ``into`` = (q int8 [rows, G, max_len, L / G], m, k int64 [rows, G, max_len, 1], column int64 [1]
    on the device, below max_len; the tensors contiguous): a decode step's keys or values (one
    token per row) written straight into a static cache's buffers at that column, which are
    returned; nothing else of them changes."""
    fn = "rope_requant"
    t_c = _int64_rows(fn, "t", t, strided=True)
    rows, width = t_c.shape
    _l.require(isinstance(head_dim, int) and head_dim > 0 and head_dim % 2 == 0 and width % head_dim == 0 and width,
               f"{fn}: head_dim {head_dim!r} must be even and divide the rows' width {width} (> 0)")
    _l.require(isinstance(qmax, int) and 0 < qmax <= 127, f"{fn}: 0 < qmax <= 127, got {qmax!r}")
    groups = width // head_dim if per_head else 1
    _l.require(groups <= ATTN_MAX_GRID, f"{fn}: {groups} heads exceed the grid's {ATTN_MAX_GRID}")
    rope = pos is not None
    _l.require(rope == (cos is not None) == (sin is not None), f"{fn}: give pos, cos and sin, or none of them")
    if rope:
        _rows_vector(fn, "pos", pos, rows, _INT)
        _l.require(cos.dim() == 2 and cos.shape[1] == head_dim // 2 and cos.dtype == torch.int64 and sin.shape == cos.shape
                   and sin.dtype == torch.int64, f"{fn}: cos and sin must be int64 [positions, {head_dim // 2}], got "
                   f"{cos.dtype} {tuple(cos.shape)} and {sin.dtype} {tuple(sin.shape)}")
    fm_c, fk_c = _fold(fn, "fold", fm, fk, rows)
    om_c, ok_c = _fold(fn, "out fold", om, ok, rows)
    tables = (pos, cos, sin) if rope else ()
    sub = width // groups
    if into is not None:
        q, sm, sk, col = into
        _l.require(q.dim() == 4 and q.dtype == torch.int8 and q.shape[0] == rows and q.shape[1] == groups
                   and q.shape[3] == sub and sm.shape == sk.shape == (*q.shape[:3], 1) and sm.dtype == sk.dtype == torch.int64
                   and all(x.is_contiguous() for x in (q, sm, sk)),
                   f"{fn}: into must be contiguous int8 [rows, G, max_len, {sub}] = [{rows}, {groups}, max_len, {sub}] and "
                   f"int64 [rows, G, max_len, 1] twice, got {q.dtype} {tuple(q.shape)}, {sm.dtype} {tuple(sm.shape)}, "
                   f"{sk.dtype} {tuple(sk.shape)}")
        _l.require(col.numel() == 1 and col.dtype == torch.int64,
                   f"{fn}: the column must be one int64, got {col.dtype} {tuple(col.shape)}")
        stride, outs = q.shape[2], (q, sm, sk, col)
    else:
        stride, outs, col = 1, (), None
    dev = _l.check_cuda(fn, t_c, *tables, *(x for x in (fm_c, fk_c, om_c, ok_c) if x is not None), *outs)
    pos_c, cos_c, sin_c = (pos.to(torch.int64).contiguous(), cos.contiguous(), sin.contiguous()) if rope else (None,) * 3
    if into is None:
        q = torch.empty((rows, width), dtype=torch.int8, device=dev)
        sm = torch.empty((rows, groups), dtype=torch.int64, device=dev)
        sk = torch.empty((rows, groups), dtype=torch.int64, device=dev)
    if t_c.numel():
        _launch("illm_rope_requant", (rows, groups), (ROW_THREADS,),
                (_l.ptr(t_c), _l.ptr(fm_c), _l.ptr(fk_c), _l.i32(int(fm is not None)), _l.ptr(cos_c), _l.ptr(sin_c),
                 _l.ptr(pos_c), _l.i32(int(rope)), _l.ptr(om_c), _l.ptr(ok_c), _l.i32(int(om is not None)), _l.ptr(q),
                 _l.ptr(sm), _l.ptr(sk), _l.ptr(col), _l.i32(stride), _l.i32(rows), _l.i32(width), _l.i32(_ld(t_c)), _l.i32(sub),
                 _l.i32(head_dim), _l.i32(qmax)), dev)
    return q, sm, sk


def swiglu(tg: torch.Tensor, gm: torch.Tensor, gk: torch.Tensor, tu: torch.Tensor, um: torch.Tensor, uk: torch.Tensor,
           qmax: int = ri.WIDE_QMAX, folds: bool = False):
    """reference.swiglu of int64 tg, tu [rows, n] with row scales (gm, gk), (um, uk): (a int64 [rows, n],
    the gate's scale m, k, the up's scale m, k [rows]); with ``folds``: (a, m, k [2, rows]), the
    gate's scale then the up's as rows, what ``requant_rows`` takes as its folds.  tg and tu may be
    column slices of one tensor (a joined gate/up DI-MatMul's output), read in place."""
    fn = "swiglu"
    _l.require(isinstance(qmax, int) and 0 < qmax <= ri.WIDE_QMAX, f"{fn}: 0 < qmax <= 2^15 - 1, got {qmax!r}")
    (tg_c, gm_c, gk_c), (tu_c, um_c, uk_c), dev = _scaled_pair(fn, ("tg", tg, gm, gk, "gate scale"),
                                                              ("tu", tu, um, uk, "up scale"), strided=True)
    rows, n = tg_c.shape
    a = torch.empty((rows, n), dtype=torch.int64, device=dev)
    fm, fk = (torch.empty((2, rows), dtype=torch.int64, device=dev) for _ in range(2))
    (sgm, sum_), (sgk, suk) = fm, fk  # rows of one tensor each, written by the kernel
    if tg_c.numel():
        import numpy as np

        _launch("illm_swiglu", (rows,), (ROW_THREADS,),
                (_l.ptr(tg_c), _l.ptr(gm_c), _l.ptr(gk_c), _l.ptr(tu_c), _l.ptr(um_c), _l.ptr(uk_c), np.int64(ri.exp_umax(ri.SILU_CLIP)),
                 _l.i32(qmax), _l.ptr(a), _l.ptr(sgm), _l.ptr(sgk), _l.ptr(sum_), _l.ptr(suk), _l.i32(rows), _l.i32(n),
                 _l.i32(_ld(tg_c))), dev)
    return (a, fm, fk) if folds else (a, sgm, sgk, sum_, suk)


def residual_norm(x: torch.Tensor, xm: torch.Tensor, xk: torch.Tensor, b: torch.Tensor, bm: torch.Tensor, bk: torch.Tensor,
                  gamma: torch.Tensor, gamma_k: int, qmax: int, clip: int = ri.CLIP_ONE, rqmax: int = ri.RESIDUAL_QMAX):
    """reference.residual_add of int64 x, b [rows, n] (|x| <= rqmax) with row scales (xm, xk), (bm, bk),
    then reference.di_rmsnorm of the sum with ``gamma`` (exponent ``gamma_k``), ``qmax`` and ``clip``,
    in one launch: (h int64 [rows, n], hm, hk [rows], q int8 [rows, n], m, k [rows])."""
    fn = "residual_norm"
    _check_wide_qmax(fn, rqmax)
    _l.require(isinstance(qmax, int) and 0 < qmax <= 127, f"{fn}: 0 < qmax <= 127, got {qmax!r}")
    _check_clip(fn, clip)
    (x_c, xm_c, xk_c), (b_c, bm_c, bk_c), dev = _scaled_pair(fn, ("x", x, xm, xk, "x scale"), ("b", b, bm, bk, "b scale"))
    rows, n = x_c.shape
    _l.require(gamma.shape == (n,) and gamma.dtype in _INT,
               f"{fn}: gamma must be integers [{n}], got {gamma.dtype} {tuple(gamma.shape)}")
    _l.check_cuda(fn, x_c, gamma)
    gamma_c = gamma.to(torch.int64).contiguous()
    h = torch.empty((rows, n), dtype=torch.int64, device=dev)
    hm, hk = _row_outputs(rows, dev)
    q = torch.empty((rows, n), dtype=torch.int8, device=dev)
    sm, sk = _row_outputs(rows, dev)
    if x_c.numel():
        _launch("illm_residual_norm", (rows,), (ROW_THREADS,),
                (_l.ptr(x_c), _l.ptr(xm_c), _l.ptr(xk_c), _l.ptr(b_c), _l.ptr(bm_c), _l.ptr(bk_c), _l.i32(rqmax),
                 _l.ptr(h), _l.ptr(hm), _l.ptr(hk), _l.ptr(gamma_c), _l.i32(gamma_k), _l.i32(qmax), _l.i32(clip), _l.ptr(q),
                 _l.ptr(sm), _l.ptr(sk), _l.i32(rows), _l.i32(n)), dev)
    return h, hm, hk, q, sm, sk


ATTN_MAX_GRID = 65535  # the attention kernel's grid.y (query heads per KV head) and grid.z (head-rows)
ATTN_MAX_D = 256  # its largest head_dim (illm::ATTN_MAX_D: the query row in static shared memory)


def attention(q: torch.Tensor, qm: torch.Tensor, qk: torch.Tensor, k8: torch.Tensor, km: torch.Tensor, kk: torch.Tensor,
              v8: torch.Tensor, vm: torch.Tensor, vk: torch.Tensor, mask: torch.Tensor, inv_sqrt_d: tuple[int, int],
              clip: float = 15.0, qdiv: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.attention on the kernel: q int8 [HR, group, T, d] with the query rows' scale (qm, qk)
    [HR / qdiv, T] (head-row hh reads row hh // qdiv: a sequence's KV heads share its query's scale,
    given once); k8, v8 int8 [HR, n, d] with the columns' scales (km, kk), (vm, vk) [HR, n]; mask
    bool or uint8 (0 / 1) [HR or 1, T, n]; ``inv_sqrt_d`` the constant (m, k).  Returns (o int64
    [HR, group, T, d], e int64 [HR, group, T]).  Needs d a multiple of 4 (the dot products take four
    int8 at once) and an int64 scratch of HR * group * T * n (each row's scores, exponentials and P,
    from one pass to the next)."""
    fn = "attention"
    _l.require(q.dim() == 4 and q.dtype == torch.int8, f"{fn}: q must be int8 [HR, group, T, d], got {q.dtype} {tuple(q.shape)}")
    hr, group, t, d = q.shape
    _l.require(d % 4 == 0 and 0 < d <= ATTN_MAX_D, f"{fn}: head_dim {d} must be a multiple of 4, at most {ATTN_MAX_D}")
    _l.require(hr <= ATTN_MAX_GRID and group <= ATTN_MAX_GRID, f"{fn}: {hr} head-rows x {group} heads exceed the grid")
    _l.require(k8.dim() == 3 and k8.dtype == torch.int8 and k8.shape[0] == hr and k8.shape[2] == d and v8.shape == k8.shape
               and v8.dtype == torch.int8, f"{fn}: k8 and v8 must be int8 [HR, n, d] = [{hr}, n, {d}], got "
               f"{k8.dtype} {tuple(k8.shape)} and {v8.dtype} {tuple(v8.shape)}")
    n = k8.shape[1]
    _l.require(mask.dtype in (torch.bool, torch.uint8) and mask.dim() == 3 and mask.shape[0] in (1, hr)
               and tuple(mask.shape[1:]) == (t, n),
               f"{fn}: mask must be bool or uint8 [HR or 1, T, n] = [{hr} or 1, {t}, {n}], got {mask.dtype} {tuple(mask.shape)}")
    _l.require(isinstance(qdiv, int) and qdiv >= 1 and hr % qdiv == 0, f"{fn}: qdiv must divide HR={hr}, got {qdiv!r}")
    qs = [x.reshape(-1) for x in (qm, qk)]
    for what, x in (("qm", qm), ("qk", qk)):
        _l.require(x.numel() == hr // qdiv * t and x.dtype in _INT,
                   f"{fn}: {what} must be integers [HR / qdiv, T] = [{hr // qdiv}, {t}], got {x.dtype} {tuple(x.shape)}")
    cols = [km, kk, vm, vk]
    for what, x in zip(("km", "kk", "vm", "vk"), cols):
        _l.require(x.numel() == hr * n and x.dtype in _INT, f"{fn}: {what} must be integers [HR, n], got {x.dtype} {tuple(x.shape)}")
    dev = _l.check_cuda(fn, q, k8, v8, mask, *qs, *cols)
    q_c, k_c, v_c = q.contiguous(), k8.contiguous(), v8.contiguous()
    qm_c, qk_c = (x.to(torch.int64).contiguous() for x in qs)
    km_c, kk_c, vm_c, vk_c = (x.reshape(-1).to(torch.int64).contiguous() for x in cols)
    mask_c = mask.to(torch.uint8).contiguous()  # (a uint8 mask as it is: the model makes it once per forward)
    # the kernel reads q and k8 rows as int32 words: 4-byte alignment (a contiguous view may start anywhere)
    q_c, k_c = (x if x.data_ptr() % 4 == 0 else x.clone() for x in (q_c, k_c))
    ps = torch.empty((hr, group, t, n), dtype=torch.int64, device=dev)
    o = torch.empty((hr, group, t, d), dtype=torch.int64, device=dev)
    e = torch.empty((hr, group, t), dtype=torch.int64, device=dev)
    if o.numel():
        import numpy as np

        _launch("illm_attention", (t, group, hr), (ROW_THREADS,),
                (_l.ptr(q_c), _l.ptr(qm_c), _l.ptr(qk_c), _l.ptr(k_c), _l.ptr(km_c), _l.ptr(kk_c), _l.ptr(v_c),
                 _l.ptr(vm_c), _l.ptr(vk_c), _l.ptr(mask_c), _l.i32(int(mask.shape[0] == hr and hr > 1)),
                 np.int64(inv_sqrt_d[0]), np.int64(inv_sqrt_d[1]), np.int64(ri.exp_umax(clip)), _l.ptr(ps), _l.ptr(o),
                 _l.ptr(e), _l.i32(t), _l.i32(group), _l.i32(n), _l.i32(d), _l.i32(qdiv)), dev)
    return o, e



def heads_requant(o: torch.Tensor, e: torch.Tensor, qmax: int, clip: int = ri.CLIP_ONE):
    """reference.heads_requant on the kernel: attention's outputs o int64 [rows, heads, t, d] with
    exponents e int64 [rows, heads, t] -> (q int8 [rows * t, heads * d], m, k int64 [rows * t])."""
    fn = "heads_requant"
    _l.require(o.dim() == 4 and o.dtype == torch.int64,
               f"{fn}: o must be int64 [rows, heads, t, d], got {o.dtype} {tuple(o.shape)}")
    rows, heads, t, d = o.shape
    _l.require(e.dtype == torch.int64 and tuple(e.shape) == (rows, heads, t),
               f"{fn}: e must be int64 [rows, heads, t] = [{rows}, {heads}, {t}], got {e.dtype} {tuple(e.shape)}")
    _l.require(isinstance(qmax, int) and 0 < qmax <= 127, f"{fn}: 0 < qmax <= 127, got {qmax!r}")
    _check_clip(fn, clip)
    _l.require(0 < heads * d < 2**31, f"{fn}: a token's heads x head_dim = {heads} x {d} must be in [1, 2^31)")
    _l.require(rows * t < 2**31, f"{fn}: {rows * t} tokens exceed the grid; run fewer at once")
    dev = _l.check_cuda(fn, o, e)
    o_c, e_c = o.contiguous(), e.contiguous()
    q = torch.empty((rows * t, heads * d), dtype=torch.int8, device=dev)
    sm, sk = _row_outputs(rows * t, dev)
    if q.numel():
        _launch("illm_heads_requant", (rows * t,), (ROW_THREADS,),
                (_l.ptr(o_c), _l.ptr(e_c), _l.i32(qmax), _l.i32(clip), _l.ptr(q), _l.ptr(sm), _l.ptr(sk), _l.i32(rows),
                 _l.i32(heads), _l.i32(t), _l.i32(d)), dev)
    return q, sm, sk


def hadamard(x: torch.Tensor, sign: torch.Tensor, lp: int) -> torch.Tensor:
    """reference.hadamard_rows of int64 x [rows, n] (n = m * 2^lp, ``sign`` A int8 [m, m] on x's
    device, entries +-1, A = [[1]] when m = 1, as ``OnlineHadamard`` builds it; |x| n < 2^63): each
    row times A (x) H_p, unnormalized, int64 [rows, n]."""
    fn = "hadamard"
    _l.require(x.dim() == 2 and x.dtype == torch.int64, f"{fn}: x must be int64 [rows, n], got {x.dtype} {tuple(x.shape)}")
    _l.require(sign.dim() == 2 and sign.shape[0] == sign.shape[1] and sign.dtype == torch.int8,
               f"{fn}: sign must be int8 [m, m], got {sign.dtype} {tuple(sign.shape)}")
    m = sign.shape[0]
    _l.require(isinstance(lp, int) and 0 <= lp <= 24 and x.shape[1] == m << lp,
               f"{fn}: the rows' width {x.shape[1]} must be m * 2^lp = {m} * 2^{lp}")
    dev = _l.check_cuda(fn, x, sign)
    x_c, sign_c = x.contiguous(), sign.contiguous()
    t = torch.empty_like(x_c)
    y = t if m == 1 else torch.empty_like(x_c)
    if x_c.numel():
        _launch("illm_hadamard", (x_c.shape[0],), (ROW_THREADS,),
                (_l.ptr(x_c), _l.ptr(sign_c), _l.ptr(t), _l.ptr(y), _l.i32(x_c.shape[0]), _l.i32(m), _l.i32(lp)), dev)
    return y
