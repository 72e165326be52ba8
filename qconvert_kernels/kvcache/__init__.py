"""Kernel family kvcache: a decoder block's new keys and values written into its static KV cache,
one launch.

Files: kvcache.cu (one thread an element of a head's key and value, tokens x head-group CTAs,
every tensor through its strides), cuda.py (launcher), reference.py (the definition: two
``index_copy_``), emulate.py (thread-exact CPU emulator of kvcache.cu, run through
``launch.launch_hook``).  ``qconvert.engine.StaticKVCache`` writes through it on a GPU.
"""

from pathlib import Path

from qconvert_kernels.spec import KernelSource

KVCACHE = KernelSource(
    family="kvcache",
    path=Path(__file__).parent / "kvcache.cu",
    kernels=("kv_write",),
)

SOURCES = (KVCACHE,)
