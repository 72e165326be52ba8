"""Kernel family illm: CUDA source, CuPy launcher (cuda.py), bit-exact torch reference (reference.py)."""
