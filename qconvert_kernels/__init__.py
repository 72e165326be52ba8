"""GEMM kernels of qconvert and their bit-exact torch references.

``reference`` holds the arithmetic that every CUDA kernel here must reproduce; the CPU
runtime runs it directly, so a model evaluated on CPU computes exactly what the GPU will.
"""
