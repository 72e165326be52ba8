"""Kernel family norm: the RMSNorm of a decode step's float glue, one launch per norm.

Files: norm.cu (one CTA per row: the sum of squares in a fixed order, IEEE-rounded division and
square root), cuda.py (launcher), reference.py (the definition: bit-exact torch reference in the
kernel's order), emulate.py (lane-exact CPU emulator of norm.cu, run through ``launch.launch_hook``).
"""

from pathlib import Path

from qconvert_kernels.spec import KernelSource

NORM = KernelSource(
    family="norm",
    path=Path(__file__).parent / "norm.cu",
    kernels=("rms_norm_f16", "rms_norm_bf16"),
)

SOURCES = (NORM,)
