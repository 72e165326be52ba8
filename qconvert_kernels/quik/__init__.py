"""Kernel family quik: QUIK W4A4 / W8A8 with fp16 outlier channels.
Files: quik_gemm.cu, quik_mainloop.cuh (byte main loop, shared with illm), cuda.py, reference.py."""

from pathlib import Path

from qconvert_kernels.spec import KernelSource

S4_GEMMS = ("quik_gemm_w4a4_s4_f16", "quik_gemm_w4a4_s4_bf16")
_S8_GEMMS = ("quik_gemm_w4a4_s8_f16", "quik_gemm_w4a4_s8_bf16", "quik_gemm_w8a8_f16", "quik_gemm_w8a8_bf16")
INT4_MMA_ARCHS = ("sm_80", "sm_86", "sm_89")  # archs with int4 tensor cores for mma.sync
QUIK = KernelSource(
    family="quik",
    path=Path(__file__).parent / "quik_gemm.cu",
    kernels=S4_GEMMS + _S8_GEMMS + ("quik_split_f16", "quik_split_bf16", "quik_split_wide_f16", "quik_split_wide_bf16",
                                    "quik_gemv_w8a8_f16", "quik_gemv_w8a8_bf16", "quik_gemv_w4a4_f16", "quik_gemv_w4a4_bf16",
                                    # W8A8 above 8 rows: QUIK's epilogue after torch._int_mm's int32 product
                                    "quik_epilogue_rows_f16", "quik_epilogue_rows_bf16"),
    gemms=S4_GEMMS + _S8_GEMMS,
    # on sm_90 ptxas emulates the s4 mma (Hopper has no int4 tensor cores): the launcher takes s8
    no_mma_on={k: ("sm_90",) for k in S4_GEMMS},
    mma_count={**{k: {a: {"IMMA.16832.S8.S8": 16} for a in ("sm_80", "sm_89", "sm_90")} for k in _S8_GEMMS},
               **{k: {a: {"IMMA.16864.S4.S4": 16} for a in ("sm_80", "sm_89")} for k in S4_GEMMS}},
)

SOURCES = (QUIK,)
