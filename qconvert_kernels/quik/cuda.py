"""CuPy launcher of the QUIK kernels (qconvert_kernels/quik/quik_gemm.cu).

``quik_linear`` runs one QUIK layer on a CUDA device: the fused split-and-quantize kernel
(outlier channels gathered as they are, the base channels to b-bit per token), the outlier
product x_out W_outᵀ (at M <= 8 in the split's own launch, ``split_outliers``; above, by cuBLAS:
``torch.matmul`` in the activations' dtype), then the integer GEMM whose epilogue dequantizes and
adds it.  The integer path follows the device:

    bits 4, sm_80 .. sm_89   "s4": int4 x int4 tensor cores (mma m16n8k64 s4), activations packed
    bits 4, sm_90 and newer  "s8r": int8 tensor cores, activations one int4 per byte, on the
                             repacked W4A8 kernels (w4a8/w4a8_repacked.cu: decode at M <= 64,
                             split-K and an 8-stage weight pipeline; prefill, 128 x 128 tiles and
                             4 stages) with QUIK's epilogue (``w4a8r_decode_quik_m*``,
                             ``w4a8r_prefill_quik``), its weights repacked once
                             (``prepare_repacked``); Hopper has no int4 mma ("s8": the first
                             design's 64 x 64 kernel, still selectable)
    bits 8                   int8 x int8 tensor cores (mma m16n8k32 s8)
    at M <= 8 (bits 4 on s4 / s8, and bits 8): a GEMV, a warp per two output columns, dp4a
                             (``quik_gemv_w8a8_*``, ``quik_gemv_w4a4_*``: the codes one per byte)

Results equal ``qconvert_kernels.quik.reference`` fed the same y_out, bit for bit before the
final rounding to fp16 / bf16.  Requirements (ValueError): Kbp a multiple of 64; sm_80+.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qconvert_kernels import launch as _l
from qconvert_kernels.illm.reference import int_mm_product  # torch._int_mm as CUDA takes it (W8A8 above 8 rows)
from qconvert_kernels.w4a8 import cuda as kc
from qconvert_kernels.quik import reference as refq
from qconvert_kernels.quik.reference import K_TILE

SOURCE = Path(__file__).with_name("quik_gemm.cu")


def module(device_index: int = 0):
    """The ``cupy.RawModule`` of quik_gemm.cu for the device (launch.build: NVRTC, no FTZ)."""
    return _l.module(SOURCE, device_index)


PATHS_4 = ("s4", "s8", "s8r")  # the 4-bit paths (the module docstring)


def int4_path(device: torch.device) -> str:
    """"s4" (int4 tensor cores) on sm_80 .. sm_89, "s8r" (int8 tensor cores, the repacked
    kernel) on sm_90 and newer."""
    major, minor = torch.cuda.get_device_capability(device)
    return "s4" if (major, minor) < (9, 0) else "s8r"


def check_gemm_shape(fn: str, m: int, n: int, kbp: int) -> None:
    where = f"{fn}: unsupported shape M={m}, N={n}, Kbp={kbp}"
    kc._require(kbp > 0 and kbp % K_TILE == 0, f"{where}: the base channels must be padded to a multiple of {K_TILE}")
    kc._require(m >= 0 and n >= 0, f"{where}: negative M or N")
    kc._require(-(-m // kc.BLOCK_M) <= 65535, f"{where}: M too large for the grid (at most {65535 * kc.BLOCK_M})")


WIDE_THREADS = 1024     # quik::WIDE_THREADS: the wide split's CTA, one per row
WIDE_MAX_KB = 16384     # quik::WIDE_MAX_KB: the most base channels it holds in registers
WIDE_MAX_M = 64         # the wide split is the default up to this many rows (one CTA per SM: at
                        # prefill the first kernel's many small CTAs per SM keep more rows in flight)
FUSED_ROWS = 8          # quik::FUSED_ROWS: the most rows whose outlier product the split makes
FUSED_MAX_OUT = 1024    # quik::FUSED_MAX_OUT: the most outlier channels it takes
GEMV_COLS = 32          # quik::GEMV_COLS: outlier-product columns per CTA
SPLIT_KERNELS = ("row", "wide")


def fuses_outliers(m: int, kbp: int, n_out: int) -> bool:
    """Whether ``quik_linear`` makes the outlier product in the split's launch (``split_outliers``):
    decode-sized M, an xq row (``kbp``: the padded base channels, or the repacked path's Kq) the wide
    split holds, and some outliers (not too many)."""
    return 0 < m <= FUSED_ROWS and kbp <= WIDE_MAX_KB and 0 < n_out <= FUSED_MAX_OUT


def default_split(m: int, kbp: int) -> str:
    """``split_quantize``'s kernel: "wide" for up to WIDE_MAX_M rows of at most WIDE_MAX_KB (padded)
    base channels, else "row"."""
    return "wide" if m <= WIDE_MAX_M and kbp <= WIDE_MAX_KB else "row"


def _split_args(fn, x, base_idx, outlier_idx, bits, pack, width):
    kc._require(x.dim() == 2 and x.dtype in kc._OUT, f"{fn}: x must be float16 / bfloat16 [M, K], got {x.dtype} {tuple(x.shape)}")
    kc._require(bits in (4, 8) and (bits == 4 or not pack), f"{fn}: bits must be 4 or 8 (pack only with 4)")
    dev = kc._check_cuda(fn, x, base_idx, outlier_idx)
    m, k = x.shape
    kb, n_out = base_idx.numel(), outlier_idx.numel()
    kc._require(kb + n_out == k, f"{fn}: {kb} base + {n_out} outlier channels != K = {k}")
    kbp = -(-kb // K_TILE) * K_TILE
    if width is not None:
        kc._require(width >= kbp and width % K_TILE == 0, f"{fn}: width {width} must be a multiple of {K_TILE} >= {kbp}")
        kbp = width
    base_idx, outlier_idx = base_idx.to(torch.int32).contiguous(), outlier_idx.to(torch.int32).contiguous()
    xq = torch.empty((m, kbp // 2) if pack else (m, kbp), dtype=torch.uint8 if pack else torch.int8, device=dev)
    s = torch.empty((m,), dtype=torch.float32, device=dev)
    z = torch.empty((m,), dtype=torch.float32, device=dev)
    return dev, x.contiguous(), base_idx, outlier_idx, m, k, kb, kbp, n_out, xq, s, z


def split_quantize(x: torch.Tensor, base_idx: torch.Tensor, outlier_idx: torch.Tensor, bits: int, pack: bool,
                   clip: float = 1.0, width: int | None = None, kernel: str | None = None):
    """x fp16 / bf16 [M, K] -> (xq, s float32 [M], z float32 [M], x_out [M, n] in x's dtype); ``clip``
    the activation clip of reference.quantize_split.

    xq: int8 [M, Kbp] (one value per byte) or, with ``pack`` (bits 4 only), uint8 [M, Kbp/2];
    ``width`` (a multiple of 64, at least Kbp) pads its columns further with zeros (the repacked
    path's Kq).  ``kernel``: "wide" (one CTA of 1024 threads per row, the row held in registers;
    the default up to WIDE_MAX_M rows of at most WIDE_MAX_KB base channels) or "row" (256 threads
    walking the row twice; any width).  Both compute the same bits."""
    fn = "quik_split"
    dev, x, base_idx, outlier_idx, m, k, kb, kbp, n_out, xq, s, z = _split_args(fn, x, base_idx, outlier_idx, bits,
                                                                                pack, width)
    kernel = kernel or default_split(m, kbp)
    kc._require(kernel in SPLIT_KERNELS, f"{fn}: kernel {kernel!r} not one of {SPLIT_KERNELS}")
    kc._require(kernel == "row" or kbp <= WIDE_MAX_KB,
                f"{fn}: the wide split holds at most {WIDE_MAX_KB} base channels (padded), got {kbp}")
    x_out = torch.empty((m, n_out), dtype=x.dtype, device=dev)
    if m and kernel == "row":
        kc._launch(f"quik_split_{kc._OUT[x.dtype]}", (m,), (kc.QUANT_THREADS,),
                   (kc._ptr(x), kc._ptr(base_idx), kc._ptr(outlier_idx), kc._ptr(xq), kc._ptr(s), kc._ptr(z),
                    kc._ptr(x_out), kc._i32(m), kc._i32(k), kc._i32(kb), kc._i32(kbp), kc._i32(n_out),
                    kc._i32(bits), kc._i32(int(pack)), np.float32(refq.clip32(clip))), dev, SOURCE)
    elif m:
        _launch_wide(dev, x, base_idx, outlier_idx, xq, s, z, x_out if n_out else None, None, None, kb, kbp, bits, pack, clip)
    return xq, s, z, x_out


def _launch_wide(dev, x, base_idx, outlier_idx, xq, s, z, x_out, w_out, y_out, kb, kbp, bits, pack, clip) -> None:
    """quik_split_wide_*: M row CTAs, and with w_out ceil(N / GEMV_COLS) outlier-product CTAs."""
    (m, k), n = x.shape, (w_out.shape[0] if w_out is not None else 0)
    kc._launch(f"quik_split_wide_{kc._OUT[x.dtype]}", (m + -(-n // GEMV_COLS),), (WIDE_THREADS,),
               (kc._ptr(x), kc._ptr(base_idx), kc._ptr(outlier_idx), kc._ptr(xq), kc._ptr(s), kc._ptr(z), kc._ptr(x_out),
                kc._ptr(w_out), kc._ptr(y_out), kc._i32(m), kc._i32(k), kc._i32(kb), kc._i32(kbp),
                kc._i32(outlier_idx.numel()), kc._i32(n), kc._i32(bits), kc._i32(int(pack)), np.float32(refq.clip32(clip))),
               dev, SOURCE)


def split_outliers(x: torch.Tensor, base_idx: torch.Tensor, outlier_idx: torch.Tensor, w_out: torch.Tensor, bits: int,
                   pack: bool, clip: float = 1.0, width: int | None = None):
    """The wide split and the outlier product in one launch (decode: ``fuses_outliers``):
    -> (xq, s, z, y_out [M, N] in x's dtype), xq, s, z as ``split_quantize``'s and
    y_out = x_out W_outᵀ summed in the order of reference.outlier_product_lanes (w_out: the
    layer's fp16 [N, n] outlier weights, read as stored whatever x's dtype)."""
    fn = "quik_split_outliers"
    dev, x, base_idx, outlier_idx, m, k, kb, kbp, n_out, xq, s, z = _split_args(fn, x, base_idx, outlier_idx, bits,
                                                                                pack, width)
    kc._require(fuses_outliers(m, kbp, n_out),
                f"{fn}: takes 1..{FUSED_ROWS} rows, at most {WIDE_MAX_KB} base and 1..{FUSED_MAX_OUT} outlier channels "
                f"(got M={m}, {kb}, {n_out}); use split_quantize and a matmul")
    kc._require(w_out.dtype == torch.float16 and w_out.dim() == 2 and w_out.shape[1] == n_out,
                f"{fn}: w_out must be float16 [N, {n_out}], got {w_out.dtype} {tuple(w_out.shape)}")
    kc._check_cuda(fn, x, w_out)  # on x's device
    w_out = w_out.contiguous()
    y_out = torch.empty((m, w_out.shape[0]), dtype=x.dtype, device=dev)
    _launch_wide(dev, x, base_idx, outlier_idx, xq, s, z, None, w_out, y_out, kb, kbp, bits, pack, clip)
    return xq, s, z, y_out


GV_ROWS = 8           # quik::GV_ROWS: the most rows the GEMVs take (QUIK's and I-LLM's)
GV_COLS_PER_CTA = 16  # quik::GV_WARPS x quik::GV_COLS
GV_THREADS = 256      # quik::GV_THREADS
GEMM_KERNELS = ("tile", "gemv", "int_mm")
EPI_THREADS = 256     # quik::EPI_THREADS


def default_gemm(m: int, n: int, bits: int, gemv_ok: bool = True) -> str:
    """The kernel ``quik_gemm`` takes by default: the GEMV at M <= GV_ROWS where the activation codes
    come one per byte (``gemv_ok``); above, W8A8 with N a multiple of 8 on torch._int_mm and
    ``quik_epilogue_rows``; else the 64 x 64 tile kernel."""
    if m <= GV_ROWS and gemv_ok:
        return "gemv"
    return "int_mm" if bits == 8 and n % 8 == 0 else "tile"


def quik_gemm(xq, s, z, qweight, wscale, wsum, y_out, bits: int, out_dtype, return_acc: bool = False,
              kernel: str | None = None):
    """The integer GEMM with QUIK's epilogue; the kernel follows the operands:

    bits 8: xq int8 [M, Kbp], qweight int8 [N, Kbp];
    bits 4: qweight uint8 [N, Kbp/2] packed, and xq uint8 [M, Kbp/2] packed (s4 path) or
    int8 [M, Kbp] (s8 path).  y_out: [M, N] in ``out_dtype`` or None.  Returns y [M, N]
    (and the int32 accumulator if ``return_acc``).  ``kernel``: "gemv" (a warp per two output
    columns, dp4a; the default at M <= 8 where the activation codes come one per byte: W8A8, and
    W4A4 with int8 xq), "int_mm" (W8A8: torch._int_mm's int32 product, cuBLASLt's int8 GEMM on the
    weights as stored, then ``quik_epilogue_rows``; the default above 8 rows where N % 8 == 0) or
    "tile" (64 x 64 tensor-core tiles, any M); the same y."""
    fn = "quik_gemm"
    kc._require(out_dtype in kc._OUT, f"{fn}: out_dtype must be torch.float16 or torch.bfloat16, got {out_dtype}")
    m, n = xq.shape[0], qweight.shape[0]
    if bits == 8:
        kc._require(xq.dtype == torch.int8 and qweight.dtype == torch.int8, f"{fn}: W8A8 takes int8 xq and qweight")
        kbp, tile = xq.shape[1], "quik_gemm_w8a8"
        kc._require(qweight.shape[1] == kbp, f"{fn}: qweight {tuple(qweight.shape)} does not match xq {tuple(xq.shape)}")
    else:
        kc._require(bits == 4 and qweight.dtype == torch.uint8, f"{fn}: W4A4 takes packed int4 qweight (uint8)")
        kbp = qweight.shape[1] * 2
        packed = xq.dtype == torch.uint8
        kc._require(xq.shape[1] == (kbp // 2 if packed else kbp) and xq.dtype in (torch.uint8, torch.int8),
                    f"{fn}: xq {xq.dtype} {tuple(xq.shape)} does not match qweight {tuple(qweight.shape)}")
        tile = "quik_gemm_w4a4_s4" if packed else "quik_gemm_w4a4_s8"
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
    gemv_ok = bits == 8 or xq.dtype == torch.int8  # the GEMV takes the codes one per byte
    kernel = kernel or default_gemm(m, n, bits, gemv_ok)
    kc._require(kernel in GEMM_KERNELS and (kernel != "gemv" or (m <= GV_ROWS and gemv_ok)) and (kernel != "int_mm" or bits == 8),
                f"{fn}: kernel {kernel!r} must be one of {GEMM_KERNELS} (gemv: at most {GV_ROWS} rows, "
                "activation codes one per byte; int_mm: W8A8)")
    args = (kc._ptr(xq), kc._ptr(s), kc._ptr(z), kc._ptr(qweight), kc._ptr(wscale), kc._ptr(wsum), kc._ptr(y_out),
            kc._ptr(y), kc._ptr(acc), kc._i32(m), kc._i32(n), kc._i32(kbp))
    if m and n and kernel == "int_mm":
        prod = int_mm_product(xq, qweight, fn)  # int32 [M', N'], M' >= M, N' >= N
        kc._launch(f"quik_epilogue_rows_{kc._OUT[out_dtype]}", (m,), (EPI_THREADS,),
                   (kc._ptr(prod), kc._ptr(s), kc._ptr(z), kc._ptr(wscale), kc._ptr(wsum), kc._ptr(y_out), kc._ptr(y),
                    kc._i32(m), kc._i32(n), kc._i32(prod.stride(0))), dev, SOURCE)
        if acc is not None:
            acc.copy_(prod[:m, :n])
    elif m and n and kernel == "gemv":
        kc._launch(f"quik_gemv_w{bits}a{bits}_{kc._OUT[out_dtype]}", (-(-n // GV_COLS_PER_CTA),), (GV_THREADS,), args, dev, SOURCE)
    elif m and n:
        kc._launch(f"{tile}_{kc._OUT[out_dtype]}", (-(-n // kc.BLOCK_N), -(-m // kc.BLOCK_M)), (kc.GEMM_THREADS,), args, dev,
                   SOURCE)
    return (y, acc) if return_acc else y


# ------------------------------------------------------------------ the repacked path (s8r)

R_GROUP = 128  # the W4A8 prefill's g = 128 loop: iscale 1 in every group of 128


@dataclass
class PreparedQuik:
    """A 4-bit QUIK linear ready for the repacked kernels: the base channels' weights as a W4A8
    integer-scale layer (``w4``: Kq = Kbp rounded up to 128, iscale 1, cscale ws, a = 0) and
    zc = ws * R (float32 [N128], the zero point's term, rounded as the reference's ws * float(R))."""

    w4: kc.PreparedW4A8
    zc: torch.Tensor

    @property
    def kq(self) -> int:
        return self.w4.kq


def prepare_repacked(qweight: torch.Tensor, wscale: torch.Tensor, wsum: torch.Tensor, device) -> PreparedQuik:
    """Repack a 4-bit QUIK layer's base weights (uint8 [N, Kbp/2]) for ``quik_gemm_repacked``
    (load time; may synchronize)."""
    fn = "quik.prepare_repacked"
    kc._require(qweight.dtype == torch.uint8 and qweight.dim() == 2, f"{fn}: qweight must be packed int4 (uint8 [N, Kbp/2])")
    n, kbp = qweight.shape[0], 2 * qweight.shape[1]
    check_gemm_shape(fn, 1, n, kbp)
    kc._require(tuple(wscale.shape) == (n,) and tuple(wsum.shape) == (n,), f"{fn}: wscale and wsum must be [N] = [{n}]")
    device = torch.device(device)
    kq = -(-kbp // R_GROUP) * R_GROUP
    padded = torch.nn.functional.pad(qweight.to(device), (0, (kq - kbp) // 2))
    ones = torch.ones((n, kq // R_GROUP), dtype=torch.int32)
    w4 = kc.prepare("w4a8-is", {"qweight": padded, "iscale": ones, "cscale": wscale.float(),
                                "alpha_log2": torch.zeros(1, dtype=torch.int32), "shape": torch.tensor([n, kq])},
                    R_GROUP, device)
    zc = torch.zeros(w4.n128, dtype=torch.float32, device=device)
    zc[:n] = wscale.to(device=device, dtype=torch.float32) * wsum.to(device=device, dtype=torch.float32)
    return PreparedQuik(w4, zc)


def quik_gemm_repacked(xq, s, z, prepared: PreparedQuik, y_out, out_dtype, return_acc: bool = False):
    """``quik_gemm``'s result for 4-bit weights on the repacked kernels: xq int8 [M, Kq] (one int4 value
    per byte, ``split_quantize(..., width=prepared.kq)``), s / z float32 [M], y_out [M, N] in
    ``out_dtype`` or None.  M <= 64 runs the decode kernel (split-K as W4A8's plan says, the
    activations taken as quantized), larger M the prefill kernel; both with QUIK's epilogue.  Every
    launch parameter from the shapes: capturable in a CUDA graph.  The prepared layer's workspace
    serves one stream at a time."""
    fn = "quik_gemm_repacked"
    p = prepared.w4
    kc._require(out_dtype in kc._OUT, f"{fn}: out_dtype must be torch.float16 or torch.bfloat16, got {out_dtype}")
    m = xq.shape[0]
    kc._require(xq.dtype == torch.int8 and tuple(xq.shape) == (m, p.kq),
                f"{fn}: xq must be int8 [M, {p.kq}], got {xq.dtype} {tuple(xq.shape)}")
    kc._require(s.shape == (m,) and z.shape == (m,), f"{fn}: s and z must be [M] = [{m}]")
    kc._require(-(-m // kc.P_BM) <= 65535, f"{fn}: M={m} too large for the grid")
    dev = kc._check_cuda(fn, xq, s, z, p.wq, *([y_out] if y_out is not None else []))
    if y_out is not None:
        kc._require(y_out.shape == (m, p.n) and y_out.dtype == out_dtype, f"{fn}: y_out must be {out_dtype} [M, N] = [{m}, {p.n}]")
        y_out = y_out.contiguous()
    xq, s, z = xq.contiguous(), s.float().contiguous(), z.float().contiguous()
    kc._check_aligned(fn, xq=xq)  # the kernels copy it 8 and 16 bytes at a time
    y = torch.empty((m, p.n), dtype=out_dtype, device=dev)
    acc = torch.empty((m, p.n), dtype=torch.int32, device=dev) if return_acc else None
    if m == 0:
        return (y, acc) if return_acc else y
    pl = kc.plan(m, p, kc.device_sm_count(dev))
    part = torch.empty(4 * pl.part_int4, dtype=torch.int32, device=dev) if pl.part_int4 else None
    flags = int(out_dtype == torch.bfloat16) | (int(p.scale16) << 2)
    spg = R_GROUP // kc.MMA_K
    quik = (kc._ptr(z), kc._ptr(prepared.zc), kc._ptr(y_out))
    if pl.kind == "decode":  # M <= 64: the decode kernel on the split's codes (no amax: A = 0)
        kc._l.launch(kc.SOURCE_R, f"w4a8r_decode_quik_m{8 * pl.mt8}", pl.grid, (kc.R_THREADS,),
                     (kc._ptr(None), kc._ptr(p.wq), kc._ptr(p.scales), kc._ptr(p.cscale), kc._i32(0), kc._ptr(y),
                      kc._ptr(acc), kc._ptr(part), kc._ptr(p.workspace), kc._i32(m), kc._i32(p.n), kc._i32(p.kq),
                      kc._i32(p.n128), kc._i32(p.n_groups), kc._i32(spg), kc._i32(p.kb), kc._i32(pl.splits),
                      kc._i32(pl.gq), kc._i32(pl.gr), kc._i32(0), kc._i32(pl.ak_log2), kc._i32(flags),
                      kc._ptr(xq), kc._ptr(s), *quik), dev, pl.smem)
    else:
        counters = torch.zeros(pl.counters, dtype=torch.int32, device=dev) if pl.counters else None
        kc._l.launch(kc.SOURCE_R, "w4a8r_prefill_quik", pl.grid, (kc.R_THREADS,),
                     (kc._ptr(xq), kc._ptr(s), kc._ptr(p.wq), kc._ptr(p.scales), kc._ptr(p.cscale), kc._i32(0),
                      kc._ptr(y), kc._ptr(acc), kc._ptr(part), kc._ptr(counters), kc._i32(m), kc._i32(p.n),
                      kc._i32(p.n128), kc._i32(p.n_groups), kc._i32(spg), kc._i32(p.kb), kc._i32(pl.splits),
                      kc._i32(pl.gq), kc._i32(pl.gr), kc._i32(pl.mtiles), kc._i32(pl.ntiles), kc._i32(pl.band_log2),
                      kc._i32(flags), *quik), dev, pl.smem)
    return (y, acc) if return_acc else y


def quik_linear(x2, base_idx, outlier_idx, qweight, wscale, wsum, outlier_weight, bits: int, path: str | None = None,
                clip: float = 1.0, prepared: PreparedQuik | None = None):
    """One QUIK layer: y [M, N] in x2's dtype (fp16 / bf16) from x2 [M, K], its activations clipped
    by ``clip``; ``path`` "s4" / "s8" / "s8r" overrides the device's choice for 4-bit layers (tests,
    bench).  The "s8r" path runs on ``prepared`` (``prepare_repacked``, done once at load time; made
    here when not given)."""
    if x2.dtype not in kc._OUT:
        raise ValueError(f"the QUIK kernels take float16 or bfloat16 activations, got {x2.dtype}; "
                         "load with dtype=torch.float16 (the default on cuda)")
    path = (path or int4_path(x2.device)) if bits == 4 else None
    kc._require(path in PATHS_4 + (None,), f"quik_linear: path {path!r} not one of {PATHS_4}")
    if path == "s8r":
        prepared = prepared or prepare_repacked(qweight, wscale, wsum, x2.device)
    width = prepared.kq if path == "s8r" else None
    kbp = width or refq.padded_base(base_idx.numel())
    pack = path == "s4" and x2.shape[0] > GV_ROWS  # at decode the GEMV takes the codes one per byte
    if fuses_outliers(x2.shape[0], kbp, outlier_idx.numel()) and outlier_weight.dtype == torch.float16:
        xq, s, z, y_out = split_outliers(x2, base_idx, outlier_idx, outlier_weight, bits, pack, clip, width)
    else:
        xq, s, z, x_out = split_quantize(x2, base_idx, outlier_idx, bits, pack, clip, width=width)
        y_out = torch.matmul(x_out, outlier_weight.to(x2.dtype).t()) if outlier_idx.numel() else None
    if path == "s8r":
        return quik_gemm_repacked(xq, s, z, prepared, y_out, x2.dtype)
    return quik_gemm(xq, s, z, qweight, wscale, wsum, y_out, bits, x2.dtype)
