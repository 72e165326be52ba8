"""Kernel family w4a8: CUDA source, CuPy launcher (cuda.py), bit-exact torch reference (reference.py)."""
