"""CUDA kernels of qconvert, one folder per family: the GEMMs (w4a8, fp8, quik, illm), hadamard (the
online transform of ``--rotate hadamard+online``) and the float glue of a decode step (norm, rope,
swiglu, kvcache), each with its CUDA sources, CuPy launcher (``cuda.py``), torch reference
(``reference.py``, bit-exact: swiglu's but for CUDA's expf, which no CPU computes) and CPU
emulator (``emulate.py``).

``reference`` modules hold the arithmetic every CUDA kernel must reproduce; the CPU runtime runs
the GEMM families' directly, so a model evaluated on CPU computes exactly what the GPU will.  Shared pieces:
``common.cuh`` (device helpers), ``launch.py`` (building without flush-to-zero, loading, launching
on torch's stream), ``compile.py`` (build checks over the discovered families), ``roofline.py``.
See docs/kernels.md.
"""
