"""Kernel family rope: the rotary position embedding of a decoder block's q and k, one launch.

Files: rope.cu (one thread a rotated pair, tokens x C CTAs, every tensor through its strides),
cuda.py (launcher), reference.py (the definition: bit-exact torch reference, equal to transformers'
``apply_rotary_pos_emb``), emulate.py (thread-exact CPU emulator of rope.cu, run through
``launch.launch_hook``).  ``qconvert.rope`` puts a model's attention layers on it.
"""

from pathlib import Path

from qconvert_kernels.spec import KernelSource

ROPE = KernelSource(
    family="rope",
    path=Path(__file__).parent / "rope.cu",
    kernels=("rope_f16", "rope_bf16"),
)

SOURCES = (ROPE,)
