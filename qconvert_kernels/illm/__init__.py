"""Kernel family illm (I-LLM, integer-only): DI-MatMul, requantization, DI-ClippedSoftmax, DI-Norm.
Files: illm_gemm.cu, cuda.py (launchers), reference.py."""

from pathlib import Path

from qconvert_kernels.spec import KernelSource

_GEMMS = ("illm_matmul_w8", "illm_matmul_w4")
ILLM = KernelSource(
    family="illm",
    path=Path(__file__).parent / "illm_gemm.cu",
    kernels=_GEMMS + ("illm_requant_rows", "illm_softmax", "illm_rmsnorm"),
    gemms=_GEMMS,
    mma_count={k: {a: {"IMMA.16832.S8.S8": 16} for a in ("sm_80", "sm_89", "sm_90")} for k in _GEMMS},
    no_float=_GEMMS + ("illm_requant_rows", "illm_softmax", "illm_rmsnorm"),
)

SOURCES = (ILLM,)
