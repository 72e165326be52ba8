"""Thread-exact CPU emulator of swiglu.cu (run through ``qconvert_kernels.launch.launch_hook``).

Every thread of the launch's grid runs the kernel's own index math, vectorized over all of them:
the row m = blockIdx.x, the column blockIdx.y * 256 + threadIdx.x and its bound, and the
addresses from the int64 row strides.  Memory is what the launcher passed (``launch.ViewMemory``):
each tensor's whole storage as 16-bit words, so a read or a write lands where the kernel's would,
and each is checked to fall on an element of that tensor's own view.  The float math is numpy
float32 with the kernel's roundings (``reference.silu_f32``: exp, the sum, the quotient; the
rounding of silu to the dtype; the product and its rounding), exp being ``reference.exp_f32``, the
CPU's stand-in for CUDA's expf.  Every output element must be written exactly once and the output
may not overlap an input (the kernel's ``__restrict__``).

    with emulate.emulating():
        out = qconvert_kernels.swiglu.cuda.swiglu(gate, up)

``emulating()`` inside another emulator's hook hands the launches that are not swiglu.cu's to it.
``mutations`` are deliberate kernel bugs (``MUTATIONS``) for the tests that show it can fail.
"""

from __future__ import annotations

import numpy as np

from qconvert_kernels import launch
from qconvert_kernels.hadamard.emulate import _f16_bits, _to_bits
from qconvert_kernels.swiglu.reference import exp_f32, silu_f32

THREADS = 256
MAX_GRID_Y = 65535
# swiglu.cu's QS_ARGS, in order, with the numpy type each must be passed as
PARAMS = ("g", "u", "out", "cols", "gs", "us", "os")
PARAM_TYPES = (np.uint64,) * 3 + (np.int32,) + (np.int64,) * 3
KERNELS = ("swiglu_f16", "swiglu_bf16")
MUTATIONS = frozenset({
    "unrounded_silu",     # silu's float32 value multiplied by up without its rounding to the dtype
    "exp_sign",           # exp(g) where the sigmoid needs exp(-g)
    "gate_up_swapped",    # silu(up) * gate
    "up_with_gate_stride",  # up's rows read through gate's row stride
    "no_column_bound",    # the bound col > I: a spare thread reads past a row's last element
})


class Emulator(launch.ChainedEmulator):
    """The launch hook: emulates swiglu.cu's launches, hands others to ``inner`` (or refuses them)."""

    FAMILY, KERNELS, MUTATIONS = "swiglu", KERNELS, MUTATIONS

    def emulate(self, name, grid, block, args, shared_mem):
        self.check_arg_types(name, args, PARAMS, PARAM_TYPES)
        if tuple(block) != (THREADS,) or shared_mem:
            raise AssertionError(f"{name}: launched with {block} threads and {shared_mem} bytes of shared memory; "
                                 f"the kernel is written for ({THREADS},) and none")
        self.check_grid(name, grid, 2, MAX_GRID_Y)
        run(name, grid, args, self.mutations)
        return name, grid, block


def run(name: str, grid: tuple, args: tuple, mutations=frozenset()) -> None:
    bf16 = name.endswith("_bf16")
    pg, pu, po, cols, gs, us, os_ = args
    cols = int(cols)
    gs, us, os_ = np.int64(gs), np.int64(us), np.int64(os_)
    mem = {n: launch.ViewMemory(n, int(p), 2) for n, p in (("g", pg), ("u", pu), ("out", po))}
    for inp in ("g", "u"):
        if mem["out"].overlaps(mem[inp]):
            raise AssertionError(f"{name}: out overlaps {inp} (the kernel's pointers are __restrict__)")

    # every thread of the grid: blockIdx (x, y), threadIdx.x
    axes = [np.arange(int(n), dtype=np.int64) for n in (grid[0], grid[1], THREADS)]
    m, y, i = (a.reshape(-1) for a in np.meshgrid(*axes, indexing="ij"))
    col = y * THREADS + i
    live = col <= cols if "no_column_bound" in mutations else col < cols
    m, col = m[live], col[live]

    def load(which: str, stride) -> np.ndarray:
        mm = mem[which]
        return _f16_bits(mm.words[mm.at(m * stride + col)], bf16)

    g, u = load("g", gs), load("u", gs if "up_with_gate_stride" in mutations else us)
    if "gate_up_swapped" in mutations:
        g, u = u, g
    if "exp_sign" in mutations:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            s = (g.astype(np.float64) / (np.float32(1) + exp_f32(g)).astype(np.float64)).astype(np.float32)
    else:
        s = silu_f32(g)
    if "unrounded_silu" not in mutations:
        s = _f16_bits(_to_bits(s, bf16), bf16)
    with np.errstate(over="ignore", invalid="ignore"):
        y_bits = _to_bits((s * u).astype(np.float32), bf16)
    mem["out"].write_all(name, mem["out"].at(m * os_ + col), y_bits, grid)


def emulating(mutations=frozenset()):
    """Run swiglu.cu's launches on this emulator (others on the hook already installed, if any);
    a context manager yielding the ``Emulator`` (its ``launches``)."""
    return Emulator.chained(mutations)
