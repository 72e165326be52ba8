"""Kernel family fp8 (ZeroQuant-FP): FP8 (E4M3) activations x FP4 (E2M1) or FP8 weights, sm_89+.
Files: fp8_gemm.cu (64 x 64 tile GEMMs, the per-token quantizer), fp8_repacked.cu (fp4-fp8 at
decode on the repacked W4A8 decode kernel, and the prefill's widening of the repacked weights to
E4M3; launched by w4a8/cuda.py), cuda.py (launchers), reference.py, emulate.py."""

from pathlib import Path

from qconvert_kernels.spec import KernelSource

_GEMMS = ("fp4_fp8_gemm_f16", "fp4_fp8_gemm_bf16", "fp8_fp8_gemm_f16", "fp8_fp8_gemm_bf16")
FP8 = KernelSource(
    family="fp8",
    path=Path(__file__).parent / "fp8_gemm.cu",
    kernels=_GEMMS + ("quantize_per_token_fp8_f16", "quantize_per_token_fp8_bf16"),
    gemms=_GEMMS,
    archs=("sm_89", "sm_90"),  # FP8 mma exists from sm_89 on; sm_80 stops at the source's #error
    mma=("QMMA", "HMMA"),      # sm_89: QMMA (FP8 tensor cores); sm_90: ptxas widens to fp16 HMMA
    mma_count={k: {"sm_89": {"QMMA.16832.F32.E4M3.E4M3": 16}, "sm_90": {"HMMA.16816.F32": 32}} for k in _GEMMS},
)


_ZQ_DECODE = tuple(f"w4a8r_decode_zq_m{m}" for m in (8, 16, 32, 64))
REPACKED = KernelSource(
    family="fp8",
    path=Path(__file__).parent / "fp8_repacked.cu",
    # the prefill's E2M1 -> E4M3 widening (the GEMM is torch._scaled_mm); LoRC's h at decode
    kernels=_ZQ_DECODE + ("w4a8r_widen_zq", "w4a8r_lorc_h_zq"),
    gemms=_ZQ_DECODE,
    archs=("sm_89", "sm_90"),
    mma=("QMMA", "HMMA"),
    # as w4a8r_decode_*: 2 x MT8 mma per k step body (a group's first step is a second copy); sm_90: two
    # fp16 HMMA per FP8 mma
    mma_count={k: {"sm_89": {"QMMA.16832.F32.E4M3.E4M3": 2 * int(k.rsplit("_m", 1)[1]) // 8},
                   "sm_90": {"HMMA.16816.F32": 4 * int(k.rsplit("_m", 1)[1]) // 8}} for k in _ZQ_DECODE},
)

SOURCES = (FP8, REPACKED)
