"""Thread-exact CPU emulator of hadamard.cu (run through ``qconvert_kernels.launch.launch_hook``).

Each CTA (one row) is emulated with the kernel's own loops and index math, vectorized over its
256 threads: the strided loads into a float32 shared buffer, every butterfly stage as the set of
(thread, q) iterations with the kernel's pair index ``((q >> s) << (s + 1)) | (q & (h - 1))``
(checked to touch disjoint words: no two threads may write one word between two barriers), the
dense +-1 stage per output with ``sign[a * m + a']`` in the kernel's order of a, and the final
multiply and round to fp16 / bf16.  float32 arithmetic is numpy's (IEEE, round to nearest even),
as the kernel's ``__fadd_rn`` / ``__fsub_rn`` / ``__fmul_rn``.  Memory is reached through
``launch.tensor_at`` (the CPU tensors the launcher passed), and the launch's dynamic shared memory
must hold the row.

    with launch.launch_hook(emulate.hook):
        y = qconvert_kernels.hadamard.cuda.transform(x_cpu_fp16, sign, lp, scale)
"""

from __future__ import annotations

import numpy as np

from qconvert_kernels import launch

THREADS = 256


def pair_index(q: np.ndarray, s: int) -> np.ndarray:
    """The first word of butterfly pair q at stage s (hadamard.cu: a zero bit inserted at bit s)."""
    h = 1 << s
    return ((q >> s) << (s + 1)) | (q & (h - 1))


def sign_index(a: int, ap: np.ndarray, m: int) -> np.ndarray:
    return a * m + ap


def _f16_bits(view: np.ndarray, bf16: bool) -> np.ndarray:
    if bf16:
        return (view.astype(np.uint32) << 16).view(np.float32)
    return view.view(np.float16).astype(np.float32)


def _to_bits(v: np.ndarray, bf16: bool) -> np.ndarray:
    if not bf16:
        with np.errstate(over="ignore"):  # overflow rounds to inf, as cvt.rn.f16.f32
            return v.astype(np.float16).view(np.uint16)
    bits = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even (finite values)
    return rounded.astype(np.uint16)


def _u16(t) -> np.ndarray:
    import torch

    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)


def hook(name: str, grid: tuple, block: tuple, args: tuple, shared_mem: int, source) -> None:
    if not name.startswith("online_hadamard_"):
        raise NotImplementedError(f"hadamard emulator: no kernel {name}")
    if tuple(block) != (THREADS,):
        raise AssertionError(f"{name}: launched with {block} threads, the kernel is written for {THREADS}")
    bf16 = name.endswith("_bf16")
    px, py, psign, rows_arg, m, lp, scale = args
    rows, m, lp, scale = int(rows_arg), int(m), int(lp), np.float32(scale)
    n = m << lp
    if 4 * n > shared_mem:
        raise AssertionError(f"{name}: the row needs {4 * n} bytes of shared memory, the launch gives {shared_mem}")
    x_t, y_t = launch.tensor_at(int(px)), launch.tensor_at(int(py))
    sign = launch.tensor_at(int(psign)).numpy().reshape(-1).astype(np.int64)
    x_bits = _u16(x_t)
    y_bits = np.empty(y_t.numel(), dtype=np.uint16)
    for row in range(int(grid[0])):
        if row >= rows:
            continue  # the kernel's early return
        y_bits[row * n : (row + 1) * n] = _cta(x_bits[row * n : (row + 1) * n], sign, m, lp, scale, bf16)
    import torch

    y_t.copy_(torch.from_numpy(y_bits.view(np.int16)).view(y_t.dtype).reshape(y_t.shape))


def _cta(x_bits: np.ndarray, sign: np.ndarray, m: int, lp: int, scale, bf16: bool) -> np.ndarray:
    n = m << lp
    buf = np.zeros(n, dtype=np.float32)
    tid = np.arange(THREADS)
    for base in range(0, n, THREADS):  # for (i = threadIdx.x; i < n; i += THREADS)
        i = base + tid
        i = i[i < n]
        buf[i] = _f16_bits(x_bits[i], bf16)
    for s in range(lp):  # one barrier after each stage
        h = 1 << s
        qs = np.arange(n >> 1)  # thread q % THREADS, iteration q // THREADS: all of a stage's work
        i = pair_index(qs, s)
        touched = np.concatenate([i, i + h])
        if touched.min() < 0 or touched.max() >= n or np.unique(touched).size != touched.size:
            raise AssertionError(f"butterfly stage {s}: threads touch overlapping or out-of-range words")
        u, v = buf[i], buf[i + h]
        buf[i] = u + v
        buf[i + h] = u - v
    o = np.arange(n)
    ap, b = o >> lp, o & ((1 << lp) - 1)
    acc = np.zeros(n, dtype=np.float32)
    for a in range(m):
        v = buf[(a << lp) | b]
        plus = sign[sign_index(a, ap, m)] > 0
        acc = np.where(plus, acc + v, acc - v).astype(np.float32)
    return _to_bits((acc * scale).astype(np.float32), bf16)
