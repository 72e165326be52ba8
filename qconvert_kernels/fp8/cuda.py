"""CuPy launcher of the ZeroQuant-FP kernels (qconvert_kernels/fp8/fp8_gemm.cu): FP8 (E4M3)
activations x FP4 (E2M1, layout fp4-fp8) or FP8 (E4M3, layout fp8-fp8) weights.

The kernels compute ``qconvert_kernels.fp8.reference``'s arithmetic; their outputs match it
within the tolerance stated there (the tensor cores' accumulation inside a group is not
specified by PTX; everything after it is the reference's float32 order).  LoRC is not in the
kernel: ``qconvert.runtime.FP8Linear`` adds ((xq t) Vᵀ) Uᵀ with torch on the GPU (a rank-r
product, 2 r (K + N) flops per token: small next to the GEMM for r << K).

What the tensor cores are: on sm_89 (Ada) ``mma...e4m3.e4m3`` is the FP8 tensor-core
instruction QMMA.16832.F32.E4M3.E4M3.  On sm_90 (Hopper) mma.sync has no FP8 path: ptxas
widens each E4M3 operand to fp16 (F2FP.F16.E4M3.UNPACK_B, exact) and issues two
HMMA.16816.F32 per FP8 mma, so these kernels run at fp16 tensor-core rate there (Hopper's FP8
rate needs wgmma, which this file does not use).  tests/test_kernels_fp8_compile.py pins both.

fp8-fp8 runs on ``torch._scaled_mm`` with per-row scales where the installed torch has that GEMM
(``prepare_fp8_fp8`` / ``fp8_fp8_scaled``, at the end of this file), its first kernel elsewhere.

Requirements, checked here with a ValueError: a device of compute capability 8.9 or newer;
group size a multiple of 32; Kp a multiple of the group size (fp4-fp8) or of 64 (fp8-fp8);
operands 16-byte aligned.  M and N are arbitrary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert_kernels import launch as _l
from qconvert_kernels.launch import check_aligned as _check_aligned, check_cuda as _check_cuda, i32 as _i32, ptr as _ptr
from qconvert_kernels.launch import require as _require

SOURCE = Path(__file__).with_name("fp8_gemm.cu")
BLOCK_M = BLOCK_N = 64  # CTA tile (zq::BM, zq::BN)
GEMM_THREADS = 128
MMA_K = 32
MIN_CAPABILITY = 89
FP8_CHUNK = 64  # fp8-fp8: Kp % 64 == 0, the tensor-core accumulator is summed in float32 every 64 k
_OUT = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _capability(index: int = 0) -> int | None:
    return _l.capability(index)


def available() -> bool:
    """True if cupy imports, torch sees CUDA and device 0 is sm_89+; never raises."""
    try:
        if not torch.cuda.is_available():
            return False
        cap = _capability(0)
        return cap is not None and cap >= MIN_CAPABILITY
    except Exception:
        return False


def check_device(what: str, index: int | None = None) -> None:
    """ValueError unless the device has FP8 tensor cores (sm_89+), naming what needs them."""
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    cap = _capability(index)
    _require(cap is not None, f"{what}: no CUDA device usable by cupy")
    _require(cap >= MIN_CAPABILITY,
             f"{what}: the FP8 kernels need compute capability 8.9 or newer (FP8 mma: Ada sm_89, Hopper sm_90); "
             f"device {index} is sm_{cap}: use an int8 scheme such as is-w4a8 on it, or run on CPU")


def module(device_index: int = 0):
    """The ``cupy.RawModule`` of fp8_gemm.cu for the device (launch.build: NVRTC, no FTZ)."""
    check_device("fp8_gemm.cu", device_index)
    return _l.module(SOURCE, device_index)


def _launch(name: str, grid: tuple, block: tuple, args: tuple, device: torch.device) -> None:
    check_device(name, device.index if device.index is not None else None)
    _l.launch(SOURCE, name, grid, block, args, device)


def check_gemm_shape(fn: str, m: int, n: int, kp: int, group_size: int) -> None:
    """ValueError unless the kernels support (M, N, K=Kp, g); the message quotes all four.
    For fp8-fp8 pass group_size = 64 (its accumulation chunk)."""
    where = f"{fn}: unsupported shape M={m}, N={n}, K={kp}, g={group_size}"
    _require(group_size % MMA_K == 0 and group_size >= MMA_K,
             f"{where}: the group size must be a positive multiple of {MMA_K} (the FP8 mma K)")
    _require(kp > 0 and kp % group_size == 0, f"{where}: K (padded) must be a positive multiple of g")
    _require(m >= 0 and n >= 0, f"{where}: negative M or N")
    _require(-(-m // BLOCK_M) <= 65535, f"{where}: M too large for the grid (at most {65535 * BLOCK_M})")


def quantize_per_token_fp8(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-token E4M3 quantizer: x fp16/bf16 [M, K] -> (xq float8_e4m3fn [M, kp], t float32 [M]).
    Equal to ``reference_fp8.quantize_per_token_fp8(x, kp)`` (same roundings; columns >= K are 0)."""
    check_device("quantize_per_token_fp8", x.device.index if x.is_cuda else None)
    xq, t = _l.quantize_per_token(SOURCE, "quantize_per_token_fp8", x, kp, torch.uint8)
    return xq.view(torch.float8_e4m3fn), t


def _common(fn, xq, t, out_dtype):
    _require(xq.dim() == 2 and xq.dtype == torch.float8_e4m3fn, f"{fn}: xq must be float8_e4m3fn [M, Kp], got {xq.dtype} {tuple(xq.shape)}")
    m = xq.shape[0]
    _require(t.shape == (m,), f"{fn}: t must be [M] = [{m}], got {tuple(t.shape)}")
    _require(out_dtype in _OUT, f"{fn}: out_dtype must be torch.float16 or torch.bfloat16, got {out_dtype}")
    return m, xq.shape[1]


def fp4_fp8_gemm(xq, t, qweight_packed, sexp, cscale, group_size: int, out_dtype):
    """Layout fp4-fp8: xq e4m3 [M, Kp], t float32 [M], qweight_packed uint8 [N, Kp/2] (E2M1 codes),
    sexp int8 [N, G], cscale float32 [N] -> y [M, N] in ``out_dtype``."""
    fn = "fp4_fp8_gemm"
    m, kp = _common(fn, xq, t, out_dtype)
    n = qweight_packed.shape[0]
    check_gemm_shape(fn, m, n, kp, group_size)
    _require(qweight_packed.dtype == torch.uint8 and qweight_packed.shape == (n, kp // 2),
             f"{fn}: qweight must be uint8 [N, Kp/2] = [{n}, {kp // 2}], got {qweight_packed.dtype} {tuple(qweight_packed.shape)}")
    g_count = kp // group_size
    _require(sexp.shape == (n, g_count) and sexp.dtype == torch.int8, f"{fn}: sexp must be int8 [N, G] = [{n}, {g_count}]")
    _require(cscale.shape == (n,), f"{fn}: cscale must be [N] = [{n}], got {tuple(cscale.shape)}")
    dev = _check_cuda(fn, xq, t, qweight_packed, sexp, cscale)
    check_device(fn, dev.index)
    xq, qw = xq.contiguous(), qweight_packed.contiguous()
    t, sexp, cscale = t.float().contiguous(), sexp.contiguous(), cscale.float().contiguous()
    _check_aligned(fn, xq=xq, qweight_packed=qw)
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    if m and n:
        grid = (-(-n // BLOCK_N), -(-m // BLOCK_M))
        _launch(f"fp4_fp8_gemm_{_OUT[out_dtype]}", grid, (GEMM_THREADS,),
                (_ptr(xq), _ptr(t), _ptr(qw), _ptr(sexp), _ptr(cscale), _ptr(y), _i32(m), _i32(n), _i32(kp), _i32(group_size)), dev)
    return y


def fp8_fp8_gemm(xq, t, qweight, wscale, out_dtype):
    """Layout fp8-fp8: xq e4m3 [M, Kp], qweight e4m3 [N, Kp] (Kp % 64 == 0), wscale float32 [N] -> y [M, N]."""
    fn = "fp8_fp8_gemm"
    m, kp = _common(fn, xq, t, out_dtype)
    n = qweight.shape[0]
    check_gemm_shape(fn, m, n, kp, FP8_CHUNK)
    _require(qweight.dtype == torch.float8_e4m3fn and qweight.shape == (n, kp),
             f"{fn}: qweight must be float8_e4m3fn [N, Kp] = [{n}, {kp}], got {qweight.dtype} {tuple(qweight.shape)}")
    _require(wscale.shape == (n,), f"{fn}: wscale must be [N] = [{n}], got {tuple(wscale.shape)}")
    dev = _check_cuda(fn, xq, t, qweight, wscale)
    check_device(fn, dev.index)
    xq, qw = xq.contiguous(), qweight.contiguous()
    t, wscale = t.float().contiguous(), wscale.float().contiguous()
    _check_aligned(fn, xq=xq, qweight=qw)
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    if m and n:
        grid = (-(-n // BLOCK_N), -(-m // BLOCK_M))
        _launch(f"fp8_fp8_gemm_{_OUT[out_dtype]}", grid, (GEMM_THREADS,),
                (_ptr(xq), _ptr(t), _ptr(qw), _ptr(wscale), _ptr(y), _i32(m), _i32(n), _i32(kp)), dev)
    return y


# ---- torch._scaled_mm: the row-wise FP8 GEMM (cuBLASLt / CUTLASS; Hopper's FP8 tensor cores through
# wgmma).  fp8-fp8 runs every M on it; fp4-fp8's prefill on its widened weights (w4a8/cuda.py).

_SCALED_MM_OUT: dict = {}  # device -> {activation dtype: the out_dtype torch._scaled_mm takes there, or None}


def scaled_mm_outputs(device) -> dict:
    """{fp16, bf16: the out_dtype with which torch._scaled_mm runs an E4M3 GEMM with per-row scales on
    ``device`` (that dtype itself, else float32, else None)}, found once per device by a 16 x 32 x 16
    product at load time: which outputs the row-wise FP8 GEMM supports depends on torch's build and
    the GPU (cuBLASLt or CUTLASS)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _SCALED_MM_OUT:
        a = torch.ones((16, 32), device=device).to(torch.float8_e4m3fn)
        b = torch.ones((16, 32), device=device).to(torch.float8_e4m3fn)
        sa, sb = torch.ones((16, 1), device=device), torch.ones((1, 16), device=device)
        found = {}
        for dt in (torch.float16, torch.bfloat16):
            found[dt] = None
            for out in (dt, torch.float32):
                try:
                    y = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out)
                    if float(y[0, 0]) == 32.0:
                        found[dt] = out
                        break
                except (RuntimeError, NotImplementedError, TypeError):
                    continue
        if not any(found.values()):
            return found  # not kept: a probe that failed for another reason is tried again at the next load
        _SCALED_MM_OUT[key] = found
    return _SCALED_MM_OUT[key]


def row_scaled_mm(xq: torch.Tensor, t: torch.Tensor, w8: torch.Tensor, wscale: torch.Tensor, n: int, out,
                  out_dtype) -> torch.Tensor:
    """y [M, n] = (xq * t[m]) (w8 * wscale[n'])^T in ``out_dtype`` by torch._scaled_mm with per-row
    scales run with output ``out`` (``scaled_mm_outputs``: out_dtype or float32): xq E4M3 [M, K'],
    w8 E4M3 [N16, K'] (N16 % 16 == 0, rows past n zero), t float32 [M], wscale float32 [N16]; y
    contiguous (the first n columns copied out when n < N16).  One GEMM over all of K in its own order."""
    y = torch._scaled_mm(xq, w8.t(), scale_a=t.float().reshape(-1, 1), scale_b=wscale.reshape(1, -1), out_dtype=out)
    return y[:, :n].to(out_dtype).contiguous()


@dataclass
class PreparedFP8:
    """A fp8-fp8 layer for ``fp8_fp8_scaled``: w8 E4M3 [N16, Kp] and wscale float32 [N16] (N rounded up
    to 16, rows past N zero; w8 is the stored qweight itself where N % 16 == 0 and it is on the
    device), and the output torch._scaled_mm takes per activation dtype on that device."""

    n: int
    kp: int
    w8: torch.Tensor
    wscale: torch.Tensor
    outs: dict

    def runs(self, dtype) -> bool:
        return bool(self.outs.get(dtype))


def prepare_fp8_fp8(qweight: torch.Tensor, wscale: torch.Tensor, device) -> PreparedFP8 | None:
    """fp8-fp8 on torch._scaled_mm (load time; may synchronize): qweight float8_e4m3fn [N, Kp],
    wscale float32 [N] moved to ``device`` and padded to N16 rows.  None where the device's torch has
    no row-wise FP8 GEMM (the layer then stays on fp8_gemm.cu's kernel)."""
    fn = "fp8.prepare_fp8_fp8"
    _require(qweight.dim() == 2 and qweight.dtype == torch.float8_e4m3fn,
             f"{fn}: qweight must be float8_e4m3fn [N, Kp], got {qweight.dtype} {tuple(qweight.shape)}")
    n, kp = qweight.shape
    _require(n > 0 and kp > 0 and kp % FP8_CHUNK == 0, f"{fn}: Kp={kp} must be a positive multiple of {FP8_CHUNK}")
    _require(tuple(wscale.reshape(-1).shape) == (n,), f"{fn}: wscale must be [N] = [{n}], got {tuple(wscale.shape)}")
    device = torch.device(device)
    if device.type == "cuda":
        check_device(fn, device.index)
    outs = scaled_mm_outputs(device)
    if not any(outs.values()):
        return None
    n16 = -(-n // 16) * 16
    if n16 == n:
        w8 = qweight.to(device).contiguous()
    else:
        w8 = torch.zeros((n16, kp), dtype=torch.uint8, device=device)
        w8[:n] = qweight.to(device).view(torch.uint8)
        w8 = w8.view(torch.float8_e4m3fn)
    ws = torch.zeros(n16, dtype=torch.float32, device=device)
    ws[:n] = wscale.reshape(-1).to(device=device, dtype=torch.float32)
    return PreparedFP8(n, kp, w8, ws, dict(outs))


def fp8_fp8_scaled(xq: torch.Tensor, t: torch.Tensor, prep: PreparedFP8, out_dtype) -> torch.Tensor:
    """Layout fp8-fp8 on torch._scaled_mm: xq e4m3 [M, Kp] and t float32 [M] from the per-token
    quantizer -> y [M, N] in out_dtype; the products of ``reference.fp8_fp8_gemm`` summed over all of
    K in the GEMM's order (within the FP8 tests' tolerance of the reference's 64-wide chunks)."""
    fn = "fp8_fp8_scaled"
    _require(prep.runs(out_dtype), f"{fn}: no row-wise FP8 GEMM for {out_dtype} output on this device (found at load: "
             f"{prep.outs}); fp8_fp8_gemm runs the stored tensors")
    _require(xq.dim() == 2 and xq.dtype == torch.float8_e4m3fn and xq.shape[1] == prep.kp,
             f"{fn}: xq must be float8_e4m3fn [M, Kp] = [*, {prep.kp}], got {xq.dtype} {tuple(xq.shape)}")
    _require(t.shape == (xq.shape[0],), f"{fn}: t must be [M] = [{xq.shape[0]}], got {tuple(t.shape)}")
    return row_scaled_mm(xq, t, prep.w8, prep.wscale, prep.n, prep.outs[out_dtype], out_dtype)
