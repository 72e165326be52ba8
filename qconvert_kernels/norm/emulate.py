"""Lane-exact CPU emulator of norm.cu (run through ``qconvert_kernels.launch.launch_hook``).

Each CTA (one row) runs with the kernel's own loops and index math, vectorized over its 256
threads: thread t's strided loads of x (elements t, t + 256, ...) and its running float32 sum of
squares (a rounded product, then a rounded add: numpy float32, IEEE round to nearest even, as
``__fmul_rn`` / ``__fadd_rn``), the xor-butterfly shuffles of each warp (lane l reads lane l ^ o),
the 8 warp sums staged through ``red`` and added in warp order, then the kernel's float64 division
by n rounded to float32, and sqrt and 1 / root (the kernel's float64 ``__dsqrt_rn`` and
``__ddiv_rn`` of float32 operands, rounded once: the correctly rounded float32 results, which
numpy's float32 square root and division give), and the two roundings to fp16 / bf16.  Global memory is reached through ``launch.tensor_at`` (the CPU tensors
the launcher passed), with its bounds checked and every output element written exactly once.

    with emulate.emulating():
        y = qconvert_kernels.norm.cuda.rms_norm(x_cpu_fp16, w, eps)

``emulating()`` inside another emulator's hook (the W4A8 one, for a whole model) hands every
launch that is not norm.cu's to that hook.  ``mutations`` are deliberate kernel bugs
(``MUTATIONS``) for the tests that show the emulator can fail.
"""

from __future__ import annotations

import numpy as np

from qconvert_kernels import launch
from qconvert_kernels.hadamard.emulate import _f16_bits, _to_bits, _u16

THREADS = 256
WARPS = THREADS // 32
KERNELS = ("rms_norm_f16", "rms_norm_bf16")
MUTATIONS = frozenset({
    "warp0_only",     # the total taken from warp 0's sum alone (the other warps' red[] left out)
    "no_eps",         # r = 1 / sqrt(var), eps left out (a zero row's r is infinite, its outputs NaN)
    "h_unrounded",    # w times x * r in float32, without rounding x * r to the dtype first
    "stride_warp",    # threads striding by 32 (a warp) instead of 256: elements read twice
})


class Emulator(launch.ChainedEmulator):
    """The launch hook: emulates norm.cu's launches, hands others to ``inner`` (or refuses them)."""

    FAMILY, KERNELS, MUTATIONS = "norm", KERNELS, MUTATIONS

    def emulate(self, name, grid, block, args, shared_mem):
        if block != (THREADS,):
            raise AssertionError(f"{name}: launched with {block} threads, the kernel is written for {THREADS}")
        run(name, grid, args, self.mutations)
        return name, grid


def run(name: str, grid: tuple, args: tuple, mutations=frozenset()) -> None:
    import torch

    bf16 = name.endswith("_bf16")
    px, pw, py, rows, n, eps = args
    rows, n, eps = int(rows), int(n), np.float32(eps)
    x_t, w_t, y_t = (launch.tensor_at(int(p)) for p in (px, pw, py))
    for what, t, need in (("x", x_t, rows * n), ("w", w_t, n), ("y", y_t, rows * n)):
        if t.numel() < need:
            raise AssertionError(f"{name}: {what} holds {t.numel()} values, the launch reads {need}")
    x_bits, w = _u16(x_t), _f16_bits(_u16(w_t)[:n], bf16)
    if not y_t.is_contiguous():
        raise AssertionError(f"{name}: y is not contiguous")
    y_bits = y_t.detach().view(torch.int16).numpy().reshape(-1).view(np.uint16)  # y's memory: stores, not a torch op
    written = np.zeros(y_bits.shape[0], np.int64)
    for row in range(int(grid[0])):
        if row >= rows:
            continue  # the kernel's early return
        at = row * n + np.arange(n)
        y_bits[at] = _cta(_f16_bits(x_bits[at], bf16), w, n, eps, bf16, mutations)
        written[at] += 1
    if (written[: rows * n] != 1).any() or grid[0] < rows:
        raise AssertionError(f"{name}: an output element written {int(written[: rows * n].min())} to "
                             f"{int(written[: rows * n].max())} times, or rows left out (grid {grid}, rows {rows})")


def _cta(x: np.ndarray, w: np.ndarray, n: int, eps, bf16: bool, mutations) -> np.ndarray:
    f32 = np.float32
    step = 32 if "stride_warp" in mutations else THREADS
    acc = np.zeros(THREADS, f32)
    tid = np.arange(THREADS)
    for base in range(0, n + THREADS, step):  # for (i = threadIdx.x; i < n; i += step)
        i = base + tid
        live = i < n
        if not live.any():
            break
        v = np.where(live, x[np.minimum(i, n - 1)], f32(0))
        acc = np.where(live, (acc + (v * v).astype(f32)).astype(f32), acc)
    lane = tid & 31
    warp0 = tid - lane
    for o in (16, 8, 4, 2, 1):  # __shfl_xor_sync: lane l reads lane l ^ o of its warp
        acc = (acc + acc[warp0 + (lane ^ o)]).astype(f32)
    red = acc[::32]  # lane 0 of each warp
    total = red[0]
    if "warp0_only" not in mutations:
        for k in range(1, WARPS):
            total = f32(total + red[k])
    var = f32(np.float64(total) / n)  # __ddiv_rn of the float32 sum by the int n, rounded to float32
    with np.errstate(divide="ignore", invalid="ignore"):  # (a NaN where the kernel makes one: no_eps)
        r = f32(f32(1.0) / f32(np.sqrt(var if "no_eps" in mutations else f32(var + eps))))
        xr = (x * r).astype(f32)
    h = xr if "h_unrounded" in mutations else _f16_bits(_to_bits(xr, bf16), bf16)
    return _to_bits((w * h).astype(f32), bf16)


def emulating(mutations=frozenset()):
    """Run norm.cu's launches on this emulator (others on the hook already installed, if any);
    a context manager yielding the ``Emulator`` (its ``launches``)."""
    return Emulator.chained(mutations)
