"""CuPy launcher of the QUIK kernels (qconvert_kernels/quik/quik_gemm.cu).

``quik_linear`` runs one QUIK layer on a CUDA device: the fused split-and-quantize kernel
(outlier channels gathered as they are, the base channels to b-bit per token), the outlier
product x_out W_outᵀ by cuBLAS (``torch.matmul`` in the activations' dtype), then the integer
GEMM whose epilogue dequantizes and adds it.  The integer path follows the device:

    bits 4, sm_80 .. sm_89   int4 x int4 tensor cores (mma m16n8k64 s4), activations packed
    bits 4, sm_90 and newer  int8 tensor cores: activations one int4 per byte, weights widened
                             in registers (Hopper has no int4 mma; ptxas would emulate it)
    bits 8                   int8 x int8 tensor cores (mma m16n8k32 s8)

Results equal ``qconvert_kernels.quik.reference`` fed the same y_out, bit for bit before the
final rounding to fp16 / bf16.  Requirements (ValueError): Kbp a multiple of 64; sm_80+.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qconvert_kernels import launch as _l
from qconvert_kernels.w4a8 import cuda as kc
from qconvert_kernels.quik import reference as refq
from qconvert_kernels.quik.reference import K_TILE

SOURCE = Path(__file__).with_name("quik_gemm.cu")


def module(device_index: int = 0):
    """The ``cupy.RawModule`` of quik_gemm.cu for the device (launch.build: NVRTC, no FTZ)."""
    return _l.module(SOURCE, device_index)


def int4_path(device: torch.device) -> str:
    """"s4" (int4 tensor cores) on sm_80 .. sm_89, "s8" (int8 tensor cores) on sm_90 and newer."""
    major, minor = torch.cuda.get_device_capability(device)
    return "s4" if (major, minor) < (9, 0) else "s8"


def check_gemm_shape(fn: str, m: int, n: int, kbp: int) -> None:
    where = f"{fn}: unsupported shape M={m}, N={n}, Kbp={kbp}"
    kc._require(kbp > 0 and kbp % K_TILE == 0, f"{where}: the base channels must be padded to a multiple of {K_TILE}")
    kc._require(m >= 0 and n >= 0, f"{where}: negative M or N")
    kc._require(-(-m // kc.BLOCK_M) <= 65535, f"{where}: M too large for the grid (at most {65535 * kc.BLOCK_M})")


def split_quantize(x: torch.Tensor, base_idx: torch.Tensor, outlier_idx: torch.Tensor, bits: int, pack: bool,
                   clip: float = 1.0):
    """x fp16 / bf16 [M, K] -> (xq, s float32 [M], z float32 [M], x_out [M, n] in x's dtype); ``clip``
    the activation clip of reference.quantize_split.

    xq: int8 [M, Kbp] (one value per byte) or, with ``pack`` (bits 4 only), uint8 [M, Kbp/2]."""
    fn = "quik_split"
    kc._require(x.dim() == 2 and x.dtype in kc._OUT, f"{fn}: x must be float16 / bfloat16 [M, K], got {x.dtype} {tuple(x.shape)}")
    kc._require(bits in (4, 8) and (bits == 4 or not pack), f"{fn}: bits must be 4 or 8 (pack only with 4)")
    dev = kc._check_cuda(fn, x, base_idx, outlier_idx)
    m, k = x.shape
    kb, n_out = base_idx.numel(), outlier_idx.numel()
    kc._require(kb + n_out == k, f"{fn}: {kb} base + {n_out} outlier channels != K = {k}")
    kbp = -(-kb // K_TILE) * K_TILE
    x = x.contiguous()
    base_idx, outlier_idx = base_idx.to(torch.int32).contiguous(), outlier_idx.to(torch.int32).contiguous()
    xq = torch.empty((m, kbp // 2) if pack else (m, kbp), dtype=torch.uint8 if pack else torch.int8, device=dev)
    s = torch.empty((m,), dtype=torch.float32, device=dev)
    z = torch.empty((m,), dtype=torch.float32, device=dev)
    x_out = torch.empty((m, n_out), dtype=x.dtype, device=dev)
    if m:
        kc._launch(f"quik_split_{kc._OUT[x.dtype]}", (m,), (kc.QUANT_THREADS,),
                   (kc._ptr(x), kc._ptr(base_idx), kc._ptr(outlier_idx), kc._ptr(xq), kc._ptr(s), kc._ptr(z),
                    kc._ptr(x_out), kc._i32(m), kc._i32(k), kc._i32(kb), kc._i32(kbp), kc._i32(n_out),
                    kc._i32(bits), kc._i32(int(pack)), np.float32(refq.clip32(clip))), dev, SOURCE)
    return xq, s, z, x_out


def quik_gemm(xq, s, z, qweight, wscale, wsum, y_out, bits: int, out_dtype, return_acc: bool = False):
    """The integer GEMM with QUIK's epilogue; the kernel follows the operands:

    bits 8: xq int8 [M, Kbp], qweight int8 [N, Kbp];
    bits 4: qweight uint8 [N, Kbp/2] packed, and xq uint8 [M, Kbp/2] packed (s4 path) or
    int8 [M, Kbp] (s8 path).  y_out: [M, N] in ``out_dtype`` or None.  Returns y [M, N]
    (and the int32 accumulator if ``return_acc``)."""
    fn = "quik_gemm"
    kc._require(out_dtype in kc._OUT, f"{fn}: out_dtype must be torch.float16 or torch.bfloat16, got {out_dtype}")
    m, n = xq.shape[0], qweight.shape[0]
    if bits == 8:
        kc._require(xq.dtype == torch.int8 and qweight.dtype == torch.int8, f"{fn}: W8A8 takes int8 xq and qweight")
        kbp, kernel = xq.shape[1], "quik_gemm_w8a8"
        kc._require(qweight.shape[1] == kbp, f"{fn}: qweight {tuple(qweight.shape)} does not match xq {tuple(xq.shape)}")
    else:
        kc._require(bits == 4 and qweight.dtype == torch.uint8, f"{fn}: W4A4 takes packed int4 qweight (uint8)")
        kbp = qweight.shape[1] * 2
        packed = xq.dtype == torch.uint8
        kc._require(xq.shape[1] == (kbp // 2 if packed else kbp) and xq.dtype in (torch.uint8, torch.int8),
                    f"{fn}: xq {xq.dtype} {tuple(xq.shape)} does not match qweight {tuple(qweight.shape)}")
        kernel = "quik_gemm_w4a4_s4" if packed else "quik_gemm_w4a4_s8"
    check_gemm_shape(fn, m, n, kbp)
    kc._require(s.shape == (m,) and z.shape == (m,), f"{fn}: s and z must be [M] = [{m}]")
    kc._require(wscale.shape == (n,) and wsum.shape == (n,), f"{fn}: wscale and wsum must be [N] = [{n}]")
    tensors = [xq, s, z, qweight, wscale, wsum] + ([y_out] if y_out is not None else [])
    dev = kc._check_cuda(fn, *tensors)
    if y_out is not None:
        kc._require(y_out.shape == (m, n) and y_out.dtype == out_dtype, f"{fn}: y_out must be {out_dtype} [M, N] = [{m}, {n}]")
        y_out = y_out.contiguous()
    xq, qweight = xq.contiguous(), qweight.contiguous()
    s, z, wscale, wsum = s.float().contiguous(), z.float().contiguous(), wscale.float().contiguous(), wsum.to(torch.int32).contiguous()
    kc._check_aligned(fn, xq=xq, qweight=qweight)
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    acc = torch.empty((m, n), dtype=torch.int32, device=dev) if return_acc else None
    if m and n:
        grid = (-(-n // kc.BLOCK_N), -(-m // kc.BLOCK_M))
        kc._launch(f"{kernel}_{kc._OUT[out_dtype]}", grid, (kc.GEMM_THREADS,),
                   (kc._ptr(xq), kc._ptr(s), kc._ptr(z), kc._ptr(qweight), kc._ptr(wscale), kc._ptr(wsum),
                    kc._ptr(y_out), kc._ptr(y), kc._ptr(acc), kc._i32(m), kc._i32(n), kc._i32(kbp)), dev, SOURCE)
    return (y, acc) if return_acc else y


def quik_linear(x2, base_idx, outlier_idx, qweight, wscale, wsum, outlier_weight, bits: int, path: str | None = None,
                clip: float = 1.0):
    """One QUIK layer: y [M, N] in x2's dtype (fp16 / bf16) from x2 [M, K], its activations clipped
    by ``clip``; ``path`` "s4" / "s8" overrides the device's choice for 4-bit layers (tests, bench)."""
    if x2.dtype not in kc._OUT:
        raise ValueError(f"the QUIK kernels take float16 or bfloat16 activations, got {x2.dtype}; "
                         "load with dtype=torch.float16 (the default on cuda)")
    pack = bits == 4 and (path or int4_path(x2.device)) == "s4"
    xq, s, z, x_out = split_quantize(x2, base_idx, outlier_idx, bits, pack, clip)
    y_out = torch.matmul(x_out, outlier_weight.to(x2.dtype).t()) if outlier_idx.numel() else None
    return quik_gemm(xq, s, z, qweight, wscale, wsum, y_out, bits, x2.dtype)
