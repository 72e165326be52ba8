"""CuPy launcher of the W4A8 CUDA kernels (qconvert_kernels/w4a8_gemm.cu).

The kernels reproduce ``qconvert_kernels.w4a8.reference`` bit for bit (int32 accumulators exactly;
float outputs = the reference's float32 result rounded to fp16 / bf16).  They take and return
torch CUDA tensors: pointers go to the kernels as ``tensor.data_ptr()`` and every launch runs
on torch's current stream.  cupy is imported lazily, so importing this module on a machine
without cupy or a GPU works; ``available()`` says whether the kernels can run.

Weight layout: the kernels read the native on-disk layout directly, ``qweight`` uint8
[N, Kp/2] row-major, low nibble = even column (docs/format.md); no load-time permutation
(``prepare_weight``) is needed.  Requirements, checked here with a ValueError: group size g a
multiple of 32 (the int8 mma K) between 32 and 16384, Kp a multiple of g, int8 / packed
operands 16-byte aligned; sm_80 or newer.  M and N are arbitrary.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from qconvert_kernels.compile import kernel_source

SOURCE = Path(__file__).with_name("w4a8_gemm.cu")
BLOCK_M = 64  # CTA tile (qk::BM, qk::BN in the source)
BLOCK_N = 64
GEMM_THREADS = 128
QUANT_THREADS = 256
MMA_K = 32
MAX_GROUP_SIZE = 16384  # float-scale exactness: |P| <= 127 * 8 * g < 2**24
_OUT = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _cupy():
    import cupy  # lazy: optional dependency

    return cupy


def available() -> bool:
    """True if cupy imports, torch sees CUDA and device 0 is sm_80+; never raises."""
    try:
        cp = _cupy()
        if cp.cuda.runtime.getDeviceCount() < 1 or not torch.cuda.is_available():
            return False
        return int(cp.cuda.Device(0).compute_capability) >= 80
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def module(device_index: int = 0):
    """The compiled ``cupy.RawModule`` (NVRTC, for the device's arch), one per device.

    The kernels are ``extern "C"`` (unmangled), so no ``name_expressions`` are needed.
    """
    cp = _cupy()
    with cp.cuda.Device(device_index):
        return cp.RawModule(code=kernel_source(SOURCE), options=("-std=c++17",))


def _launch(name: str, grid: tuple, block: tuple, args: tuple, device: torch.device, get_module=None) -> None:
    """Launch kernel ``name`` of ``get_module(device_index)`` (default: this file's module) on
    torch's current stream."""
    cp = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cp.cuda.Device(index):
        fn = (get_module or module)(index).get_function(name)
        with cp.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
            fn(grid, block, args)


def _ptr(t: torch.Tensor | None):
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


def _i32(v: int):
    import numpy as np

    return np.int32(v)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_cuda(fn: str, *tensors: torch.Tensor) -> torch.device:
    dev = tensors[0].device
    for t in tensors:
        _require(t.is_cuda and t.device == dev, f"{fn}: all tensors must be on one CUDA device (got {[str(x.device) for x in tensors]})")
    return dev


def _check_aligned(fn: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        _require(t.data_ptr() % 16 == 0, f"{fn}: {name} must be 16-byte aligned (data_ptr {t.data_ptr():#x})")


def check_gemm_shape(fn: str, m: int, n: int, kp: int, group_size: int) -> None:
    """ValueError unless the kernels support (M, N, K=Kp, g); the message quotes all four."""
    where = f"{fn}: unsupported shape M={m}, N={n}, K={kp}, g={group_size}"
    _require(group_size % MMA_K == 0 and MMA_K <= group_size <= MAX_GROUP_SIZE,
             f"{where}: the group size must be a multiple of {MMA_K} (the int8 mma K) in [{MMA_K}, {MAX_GROUP_SIZE}]")
    _require(kp > 0 and kp % group_size == 0, f"{where}: K (padded) must be a positive multiple of g")
    _require(m >= 0 and n >= 0, f"{where}: negative M or N")
    _require(-(-m // BLOCK_M) <= 65535, f"{where}: M too large for the grid (at most {65535 * BLOCK_M})")


def _gemm_common(fn, xq, t, qweight, group_size, out_dtype):
    _require(xq.dim() == 2 and qweight.dim() == 2, f"{fn}: xq [M, Kp] and qweight [N, Kp/2] must be 2-D")
    m, kp = xq.shape
    n = qweight.shape[0]
    check_gemm_shape(fn, m, n, kp, group_size)
    _require(xq.dtype == torch.int8, f"{fn}: xq must be int8, got {xq.dtype}")
    _require(qweight.dtype == torch.uint8, f"{fn}: qweight must be uint8 (packed int4), got {qweight.dtype}")
    _require(qweight.shape[1] * 2 == kp, f"{fn}: qweight {tuple(qweight.shape)} does not match xq {tuple(xq.shape)} (need [N, Kp/2])")
    _require(t.shape == (m,), f"{fn}: t must be [M] = [{m}], got {tuple(t.shape)}")
    _require(out_dtype in _OUT, f"{fn}: out_dtype must be torch.float16 or torch.bfloat16, got {out_dtype}")
    return m, n, kp, kp // group_size


def quantize_per_token_int8(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-token int8 quantizer: x fp16/bf16 [M, K] -> (xq int8 [M, kp], t float32 [M]).

    Bit-exact with ``reference.quantize_per_token_int8(x, kp)``; columns K..kp-1 are 0.
    """
    return _quantize_per_token("quantize_per_token_int8", x, kp, torch.int8)


def _quantize_per_token(fn: str, x: torch.Tensor, kp: int, q_dtype: torch.dtype, get_module=None):
    """Checks, output buffers and launch shared by the per-token quantizers (int8, fp8): kernel
    ``{fn}_{f16|bf16}`` writes xq [M, kp] (zero-padded) and the float32 scale t [M]."""
    _require(x.dim() == 2, f"{fn}: x must be [M, K], got {tuple(x.shape)}")
    _require(x.dtype in _OUT, f"{fn}: x must be float16 or bfloat16, got {x.dtype}")
    m, k = x.shape
    _require(kp >= k, f"{fn}: kp={kp} < K={k}")
    dev = _check_cuda(fn, x)
    x = x.contiguous()
    xq = torch.empty((m, kp), dtype=q_dtype, device=dev)
    t = torch.empty((m,), dtype=torch.float32, device=dev)
    if m:
        _launch(f"{fn}_{_OUT[x.dtype]}", (m,), (QUANT_THREADS,),
                (_ptr(x), _ptr(xq), _ptr(t), _i32(m), _i32(k), _i32(kp)), dev, get_module)
    return xq, t


def w4a8_is_gemm(xq, t, qweight_packed, iscale, cscale, alpha_log2: int, group_size: int, out_dtype, return_acc: bool = False):
    """Integer-scale W4A8 GEMM (layout w4a8-is) on int8 tensor cores.

    xq int8 [M, Kp], t float32 [M], qweight_packed uint8 [N, Kp/2], iscale int32 [N, G],
    cscale float32 [N], alpha_log2 int.  Returns y [M, N] in ``out_dtype`` (and the int32
    accumulator A [M, N] if ``return_acc``):  y = float(A) * (t[m] * (cscale[n] / 2^a)).
    """
    fn = "w4a8_is_gemm"
    m, n, kp, g_count = _gemm_common(fn, xq, t, qweight_packed, group_size, out_dtype)
    _require(iscale.shape == (n, g_count), f"{fn}: iscale must be [N, G] = [{n}, {g_count}], got {tuple(iscale.shape)}")
    _require(cscale.shape == (n,), f"{fn}: cscale must be [N] = [{n}], got {tuple(cscale.shape)}")
    alpha_log2 = int(alpha_log2)
    _require(-126 <= alpha_log2 <= 126, f"{fn}: alpha_log2={alpha_log2} out of [-126, 126]")
    dev = _check_cuda(fn, xq, t, qweight_packed, iscale, cscale)
    xq, qw = xq.contiguous(), qweight_packed.contiguous()
    t, iscale, cscale = t.float().contiguous(), iscale.to(torch.int32).contiguous(), cscale.float().contiguous()
    _check_aligned(fn, xq=xq, qweight_packed=qw)
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    acc = torch.empty((m, n), dtype=torch.int32, device=dev) if return_acc else None
    if m and n:
        grid = (-(-n // BLOCK_N), -(-m // BLOCK_M))
        _launch(f"w4a8_is_gemm_{_OUT[out_dtype]}", grid, (GEMM_THREADS,),
                (_ptr(xq), _ptr(t), _ptr(qw), _ptr(iscale), _ptr(cscale), _i32(alpha_log2), _ptr(y), _ptr(acc),
                 _i32(m), _i32(n), _i32(kp), _i32(group_size)), dev)
    return (y, acc) if return_acc else y


def w4a8_fs_gemm(xq, t, qweight_packed, scales, group_size: int, out_dtype):
    """Float-scale W4A8 GEMM (layout w4a8-fs): y = t[m] * sum_j float(scales[n, j]) * float(P[j])
    accumulated in float32 in group order without FMA; scales fp16 [N, G]; y [M, N] in out_dtype."""
    fn = "w4a8_fs_gemm"
    m, n, kp, g_count = _gemm_common(fn, xq, t, qweight_packed, group_size, out_dtype)
    _require(scales.shape == (n, g_count), f"{fn}: scales must be [N, G] = [{n}, {g_count}], got {tuple(scales.shape)}")
    _require(scales.dtype == torch.float16, f"{fn}: scales must be float16, got {scales.dtype}")
    dev = _check_cuda(fn, xq, t, qweight_packed, scales)
    xq, qw = xq.contiguous(), qweight_packed.contiguous()
    t, scales = t.float().contiguous(), scales.contiguous()
    _check_aligned(fn, xq=xq, qweight_packed=qw)
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    if m and n:
        grid = (-(-n // BLOCK_N), -(-m // BLOCK_M))
        _launch(f"w4a8_fs_gemm_{_OUT[out_dtype]}", grid, (GEMM_THREADS,),
                (_ptr(xq), _ptr(t), _ptr(qw), _ptr(scales), _ptr(y), _i32(m), _i32(n), _i32(kp), _i32(group_size)), dev)
    return y
