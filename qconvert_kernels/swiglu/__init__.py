"""Kernel family swiglu: the gated activation of a Llama-family MLP, silu(gate) * up, one launch.

Files: swiglu.cu (one thread an element, rows x column-chunk CTAs, rows through their strides),
cuda.py (launcher), reference.py (the definition, torch's two ops written out), emulate.py
(thread-exact CPU emulator of swiglu.cu, run through ``launch.launch_hook``).  ``qconvert.mlp``
puts a model's MLPs on it.
"""

from pathlib import Path

from qconvert_kernels.spec import KernelSource

SWIGLU = KernelSource(
    family="swiglu",
    path=Path(__file__).parent / "swiglu.cu",
    kernels=("swiglu_f16", "swiglu_bf16"),
)

SOURCES = (SWIGLU,)
