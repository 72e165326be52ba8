"""GEMM kernels of qconvert, one folder per family (w4a8, fp8, quik, illm; and hadamard, the online
transform of ``--rotate hadamard+online``), each with its CUDA
sources, CuPy launcher (``cuda.py``) and bit-exact torch reference (``reference.py``).

``reference`` modules hold the arithmetic every CUDA kernel must reproduce; the CPU runtime runs
them directly, so a model evaluated on CPU computes exactly what the GPU will.  Shared pieces:
``common.cuh`` (device helpers), ``launch.py`` (building without flush-to-zero, loading, launching
on torch's stream), ``compile.py`` (build checks over the discovered families), ``roofline.py``.
See docs/kernels.md.
"""
