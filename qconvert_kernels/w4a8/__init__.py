"""Kernel family w4a8: int8 activations x packed int4 group weights (layouts w4a8-is, w4a8-fs).

Files: w4a8_gemm.cu (native-layout 64 x 64 GEMMs and the per-token int8 quantizer),
w4a8_mainloop.cuh (their main loop, shared with quik and illm), w4a8_repacked.cu (the decode and
prefill kernels on load-time repacked weights), cuda.py (launchers: ``prepare`` / ``linear``),
repack.py (the repacked layout), reference.py (bit-exact torch reference), emulate.py (lane-exact
CPU emulator of the repacked kernels).
"""

from pathlib import Path

from qconvert_kernels.spec import KernelSource

_HERE = Path(__file__).parent

_NATIVE_GEMMS = ("w4a8_is_gemm_f16", "w4a8_is_gemm_bf16", "w4a8_fs_gemm_f16", "w4a8_fs_gemm_bf16")
NATIVE = KernelSource(
    family="w4a8",
    path=_HERE / "w4a8_gemm.cu",
    kernels=_NATIVE_GEMMS + ("quantize_per_token_int8_f16", "quantize_per_token_int8_bf16"),
    gemms=_NATIVE_GEMMS,
    # 2 m16 x 4 n8 tiles per warp, 2 k steps per stage (unrolled): 16 x m16n8k32 s8
    mma_count={k: {a: {"IMMA.16832.S8.S8": 16} for a in ("sm_80", "sm_89", "sm_90")} for k in _NATIVE_GEMMS},
)

_DECODE = tuple(f"w4a8r_decode_{v}_m{m}" for v in ("is", "fs", "quik") for m in (8, 16, 32, 64))  # quik: QUIK W4A4, sm_90
_PREFILL = ("w4a8r_prefill_is", "w4a8r_prefill_fs", "w4a8r_prefill_quik")  # quik: QUIK W4A4 on sm_90
_PREFILL_BM64 = ("w4a8r_prefill_is_bm64", "w4a8r_prefill_fs_bm64")  # 64-token tiles, two CTAs per SM
_ARCHS = ("sm_80", "sm_89", "sm_90")
REPACKED = KernelSource(
    family="w4a8",
    path=_HERE / "w4a8_repacked.cu",
    kernels=_DECODE + _PREFILL + _PREFILL_BM64 + ("w4a8r_quantize_f16", "w4a8r_quantize_bf16"),
    gemms=_DECODE + _PREFILL + _PREFILL_BM64,
    # decode: one m16 (weights) x MT8 n8 (tokens) tile per warp per k step, the first k step of a
    # group with a zero accumulator (a second copy of the step): 2 x MT8 IMMA; prefill: 2 x 8 tiles
    # per k step (2 x 4 with 64-token tiles), twice in the one-step loop (any group size) and 4 times in
    # the g = 128 stage loop
    mma_count={**{k: {a: {"IMMA.16832.S8.S8": 2 * int(k.rsplit("_m", 1)[1]) // 8} for a in _ARCHS} for k in _DECODE},
               **{k: {a: {"IMMA.16832.S8.S8": 16 * 2 + 16 * 4} for a in _ARCHS} for k in _PREFILL},
               **{k: {a: {"IMMA.16832.S8.S8": 8 * 2 + 8 * 4} for a in _ARCHS} for k in _PREFILL_BM64}},
)

SOURCES = (NATIVE, REPACKED)
