"""Kernel family illm (I-LLM, integer-only): DI-MatMul (its epilogue alone after torch._int_mm too),
requantization, DI-ClippedSoftmax, DI-Norm, and the integer glue of a block fused per row (q, k and v
through RoPE, SwiGLU, the residual add with the next norm, attention and its heads' requantization,
online Hadamard).
Files: illm_gemm.cu, cuda.py (launchers), reference.py."""

from pathlib import Path

from qconvert_kernels.spec import KernelSource

_GEMMS = ("illm_matmul_w8", "illm_matmul_w4")
_ROWS = ("illm_dyadic_rows", "illm_requant_rows", "illm_softmax", "illm_rmsnorm", "illm_rope_requant", "illm_swiglu", "illm_residual_norm",
         "illm_attention", "illm_heads_requant", "illm_hadamard")
ILLM = KernelSource(
    family="illm",
    path=Path(__file__).parent / "illm_gemm.cu",
    kernels=_GEMMS + _ROWS + ("illm_gemv_w8", "illm_gemv_w4"),
    gemms=_GEMMS,
    mma_count={k: {a: {"IMMA.16832.S8.S8": 16} for a in ("sm_80", "sm_89", "sm_90")} for k in _GEMMS},
    no_float=_GEMMS + _ROWS + ("illm_gemv_w8", "illm_gemv_w4"),
)

SOURCES = (ILLM,)
