"""Shared solvers: used by methods and by the conversion, never copied."""
