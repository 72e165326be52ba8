"""Kernel family hadamard: the online Hadamard transform of ``--rotate hadamard+online``.

Files: hadamard.cu (rows x C CTAs: each runs a row's Sylvester butterflies, then its chunks of
the dense +-1 factor),
cuda.py (launcher), reference.py (the definition: bit-exact torch reference), emulate.py
(thread-exact CPU emulator of hadamard.cu, run through ``launch.launch_hook``).
"""

from pathlib import Path

from qconvert_kernels.spec import KernelSource

HADAMARD = KernelSource(
    family="hadamard",
    path=Path(__file__).parent / "hadamard.cu",
    kernels=("online_hadamard_f16", "online_hadamard_bf16"),
)

SOURCES = (HADAMARD,)
