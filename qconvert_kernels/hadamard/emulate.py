"""Thread-exact CPU emulator of hadamard.cu (run through ``qconvert_kernels.launch.launch_hook``).

Each CTA (row, c) is emulated with the kernel's own loops and index math, vectorized over its
threads' iterations:

- the load: with lp >= 3, eight inputs a 16-byte load (the row's address checked for it) and
  butterfly stages 0 .. 2 among those eight in registers; else one input a thread;
- every pass of up to three stages as the set of its groups, each group's 2^S words
  ``pass_index(q, s0, S) + r * 2^s0`` (checked to be disjoint and inside the row: no two threads
  may write one word between two barriers), the stages run on them in the kernel's order;
- the dense factor as the CTA's (chunk, column) items, ``j = chunk_of(c, item >> lp, cl)``, eight
  accumulators each, a = 0 .. m - 1 in order, the table read at ``table_index`` (bounds-checked);
- the final multiply and round to fp16 / bf16.

Across the grid, every output must be written exactly once.  float32 arithmetic is numpy's (IEEE,
round to nearest even), as the kernel's ``__fadd_rn`` / ``__fsub_rn`` / ``__fmaf_rn`` (t * (+-1)
is exact, so the fma's one rounding is numpy's add of the product) / ``__fmul_rn``.  Memory is
reached through ``launch.tensor_at`` (the CPU tensors the launcher passed), and the launch's
dynamic shared memory must hold the row.

    with launch.launch_hook(emulate.hook):
        y = qconvert_kernels.hadamard.cuda.transform(x_cpu_fp16, sign, lp, scale)
"""

from __future__ import annotations

import numpy as np

from qconvert_kernels import launch

THREADS = 256
R = 8


def pass_index(q: np.ndarray, s0: int, S: int) -> np.ndarray:
    """The first word of group q of a pass of S stages from s0 (hadamard.cu: S zero bits inserted
    at bit s0)."""
    h = 1 << s0
    return ((q >> s0) << (s0 + S)) | (q & (h - 1))


def chunk_of(c: int, jl: np.ndarray, cl: int) -> np.ndarray:
    """The chunk of A's columns of CTA c's jl-th chunk (C = 2^cl CTAs a row)."""
    return c + (jl << cl)


def table_index(a: int, j: np.ndarray, r: int, mp: int) -> np.ndarray:
    """Where the kernel reads A[a, 8 j + r] in the padded float32 table."""
    return a * mp + (j << 3) + r


def _stages(v: list, S: int) -> None:
    """hadamard.cu's stages<S> on the 2^S arrays v[r] (in place)."""
    for u in range(S):
        for r in range(1 << S):
            if r & (1 << u):
                continue
            a, b = v[r], v[r + (1 << u)]
            v[r], v[r + (1 << u)] = a + b, a - b


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
    px, py, ptable, rows_arg, m, lp, scale = args
    rows, m, lp, scale = int(rows_arg), int(m), int(lp), np.float32(scale)
    n = m << lp
    if 4 * n > shared_mem:
        raise AssertionError(f"{name}: the row needs {4 * n} bytes of shared memory, the launch gives {shared_mem}")
    ctas = int(grid[1]) if len(grid) > 1 else 1
    if ctas < 1 or ctas & (ctas - 1):
        raise AssertionError(f"{name}: gridDim.y = {ctas}; the kernel takes log2 of it with __ffs (a power of two)")
    if lp >= 3 and int(px) % 16:
        raise AssertionError(f"{name}: x at {int(px):#x} is not 16-byte aligned; the kernel reads eight inputs at once")
    if int(ptable) % 16:
        raise AssertionError(f"{name}: the table at {int(ptable):#x} is not 16-byte aligned; the kernel reads it as float4")
    x_t, y_t = launch.tensor_at(int(px)), launch.tensor_at(int(py))
    table = launch.tensor_at(int(ptable)).numpy().reshape(-1).astype(np.float32)
    x_bits = _u16(x_t)
    y_bits = np.zeros(y_t.numel(), dtype=np.uint16)
    written = np.zeros(y_t.numel(), dtype=np.int64)
    for row in range(int(grid[0])):
        if row >= rows:
            continue  # the kernel's early return
        buf = _butterflies(x_bits[row * n : (row + 1) * n], m, lp, bf16)
        for c in range(ctas):
            _dense(buf, table, m, lp, scale, bf16, c, ctas, y_bits, written, row * n)
    if not np.all(written[: rows * n] == 1):
        bad = int(np.flatnonzero(written[: rows * n] != 1)[0])
        raise AssertionError(f"{name}: output {bad} written {int(written[bad])} times (each must be written once)")
    import torch

    y_t.copy_(torch.from_numpy(y_bits.view(np.int16)).view(y_t.dtype).reshape(y_t.shape))


def _check_words(words: np.ndarray, n: int, what: str) -> None:
    if words.min() < 0 or words.max() >= n or np.unique(words).size != words.size:
        raise AssertionError(f"{what}: threads touch overlapping or out-of-range words")


def _butterflies(x_bits: np.ndarray, m: int, lp: int, bf16: bool) -> np.ndarray:
    """The shared row after the load and every pass (each CTA of the row computes the same)."""
    n = m << lp
    buf = np.zeros(n, dtype=np.float32)
    s = 0
    if lp >= 3:  # uint4 loads of eight inputs, stages 0 .. 2 in registers, two float4 stores
        g = np.arange(n >> 3)
        v = [_f16_bits(x_bits[(g << 3) + r], bf16) for r in range(8)]
        _stages(v, 3)
        for r in range(8):
            buf[(g << 3) + r] = v[r]
        s = 3
    else:
        buf[:] = _f16_bits(x_bits[:n], bf16)
    while s < lp:  # passes of three stages, then one of what is left (one barrier each)
        S = min(3, lp - s)
        q = np.arange(n >> S)
        i0 = pass_index(q, s, S)
        words = [i0 + (r << s) for r in range(1 << S)]
        _check_words(np.concatenate(words), n, f"butterfly pass from stage {s}")
        v = [buf[w] for w in words]
        _stages(v, S)
        for w, val in zip(words, v):
            buf[w] = val
        s += S
    return buf


def _dense(buf, table, m, lp, scale, bf16, c, ctas, y_bits, written, base) -> None:
    """CTA c's (chunk, column) items of the dense factor, written into y_bits[base:]."""
    cl = ctas.bit_length() - 1
    chunks = (m + R - 1) >> 3
    mine = (chunks - c + ctas - 1) >> cl
    mp = chunks << 3
    items = np.arange(max(mine, 0) << lp)
    if items.size == 0:
        return
    b = items & ((1 << lp) - 1)
    j = chunk_of(c, items >> lp, cl)
    acc = np.zeros((R, items.size), dtype=np.float32)
    for a in range(m):
        v = buf[(a << lp) | b]
        for r in range(R):
            at = table_index(a, j, r, mp)
            if at.min() < 0 or at.max() >= table.size:
                raise AssertionError(f"table read at {int(at.max())} outside its {table.size} words")
            acc[r] = acc[r] + v * table[at]  # v * (+-1 or 0) is exact: one rounding, as the fma
    for r in range(R):
        ap = (j << 3) + r
        keep = ap < m
        out = base + ((ap[keep] << lp) | b[keep])
        y_bits[out] = _to_bits((acc[r][keep] * scale).astype(np.float32), bf16)
        np.add.at(written, out, 1)
