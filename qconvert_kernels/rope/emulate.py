"""Thread-exact CPU emulator of rope.cu (run through ``qconvert_kernels.launch.launch_hook``).

Every thread of the launch's grid runs the kernel's own index math, vectorized over all of them:
the head blockIdx.y * blockDim.y + threadIdx.y and its bound, the token t = blockIdx.x and row
b = blockIdx.z, the pair i = threadIdx.x, q or k by the head, and the addresses from the int64
stride arguments.  Memory is what the launcher passed (``launch.tensor_at``): each tensor's whole storage
as 16-bit words, so a read or a write lands where the kernel's would, and each is checked to fall
on an element of that tensor's own view (a stride mixed up, a spare thread or a wrong half reads
outside it, or in a neighbour's columns).  The float math is numpy float32 with the kernel's
roundings (products, the two roundings to fp16 / bf16 and the sum: IEEE round to nearest even,
as ``__fmul_rn`` / ``__fadd_rn`` / ``cvt.rn``).  Every output element must be written exactly once
and no output may overlap an input (the kernel's ``__restrict__``).

    with emulate.emulating():
        qo, ko = qconvert_kernels.rope.cuda.rope(q_cpu, k_cpu, cos, sin)

``emulating()`` inside another emulator's hook hands the launches that are not rope.cu's to it.
``mutations`` are deliberate kernel bugs (``MUTATIONS``) for the tests that show it can fail.
"""

from __future__ import annotations

import numpy as np

from qconvert_kernels import launch
from qconvert_kernels.hadamard.emulate import _f16_bits, _to_bits

MAX_THREADS = 1024
MAX_GRID_YZ = 65535
# rope.cu's QR_ARGS, in order, with the numpy type each must be passed as (CuPy packs an argument
# by its type: an int32 where the kernel reads a long long would shift every later argument)
PARAMS = ("q", "k", "cos", "sin", "qo", "ko", "hq", "hk", "half", "qb", "qh", "qt", "kb", "kh", "kt",
          "qob", "qoh", "qot", "kob", "koh", "kot", "cb", "ct", "sb", "st")
PARAM_TYPES = (np.uint64,) * 6 + (np.int32,) * 3 + (np.int64,) * 16
KERNELS = ("rope_f16", "rope_bf16")
MUTATIONS = frozenset({
    "sin_sign",           # the first half adds x[i + h] * sin[i]: rotate_half's negation left out
    "same_half_table",    # the second half reads cos[i], sin[i] (right only where the halves are equal)
    "unrounded_products", # the products summed in float32 without their rounding to the dtype
    "k_with_q_strides",   # k read through q's strides
    "table_batch_shared", # cos and sin read at row 0's positions for every row (the b stride left out)
    "spare_threads",      # the bound head > Hq + Hk: a spare head row reads past k's last head
})


class Emulator(launch.ChainedEmulator):
    """The launch hook: emulates rope.cu's launches, hands others to ``inner`` (or refuses them)."""

    FAMILY, KERNELS, MUTATIONS = "rope", KERNELS, MUTATIONS

    def emulate(self, name, grid, block, args, shared_mem):
        self.check_arg_types(name, args, PARAMS, PARAM_TYPES)
        if len(block) != 2 or block[0] * block[1] > MAX_THREADS or int(block[0]) != int(args[8]) or shared_mem:
            raise AssertionError(f"{name}: launched with {block} threads and {shared_mem} bytes of shared memory; "
                                 f"the kernel is written for (D / 2, H') threads, at most {MAX_THREADS}, and none")
        self.check_grid(name, grid, 3, MAX_GRID_YZ)
        run(name, grid, block, args, self.mutations)
        return name, grid, block


def run(name: str, grid: tuple, block: tuple, args: tuple, mutations=frozenset()) -> None:
    bf16 = name.endswith("_bf16")
    pq, pk, pc, ps, pqo, pko, hq, hk, half, *strides = args
    hq, hk, half = int(hq), int(hk), int(half)
    qb, qh, qt, kb, kh, kt, qob, qoh, qot, kob, koh, kot, cb, ct, sb, st = (np.int64(s) for s in strides)
    mem = {n: launch.ViewMemory(n, int(p), 2) for n, p in (("q", pq), ("k", pk), ("cos", pc), ("sin", ps), ("qo", pqo), ("ko", pko))}
    for out, inp in (("qo", "q"), ("qo", "k"), ("qo", "cos"), ("qo", "sin"), ("ko", "q"), ("ko", "k"),
                     ("ko", "cos"), ("ko", "sin"), ("qo", "ko")):
        if mem[out].overlaps(mem[inp]):
            raise AssertionError(f"{name}: {out} overlaps {inp} (the kernel's pointers are __restrict__)")

    # every thread of the grid: blockIdx (x, y, z), threadIdx (x, y)
    axes = [np.arange(int(n), dtype=np.int64) for n in (grid[0], grid[1], grid[2], block[0], block[1])]
    t, y, b, i, j = (a.reshape(-1) for a in np.meshgrid(*axes, indexing="ij"))
    head = y * int(block[1]) + j
    live = head <= hq + hk if "spare_threads" in mutations else head < hq + hk
    t, b, i, head = t[live], b[live], i[live], head[live]
    is_q = head < hq
    h = np.where(is_q, head, head - hq)
    kstr = (qb, qh, qt) if "k_with_q_strides" in mutations else (kb, kh, kt)
    xo_q, xo_k = b * qb + h * qh + t * qt, b * kstr[0] + h * kstr[1] + t * kstr[2]
    yo_q, yo_k = b * qob + h * qoh + t * qot, b * kob + h * koh + t * kot
    tb = 0 if "table_batch_shared" in mutations else b
    co, so = tb * cb + t * ct, tb * sb + t * st

    def load(which: str, offsets: np.ndarray) -> np.ndarray:
        m = mem[which]
        return _f16_bits(m.words[m.at(offsets)], bf16)

    def load_x(offsets_q, offsets_k):
        v = np.empty(len(head), np.float32)
        v[is_q] = load("q", offsets_q[is_q])
        v[~is_q] = load("k", offsets_k[~is_q])
        return v

    x1, x2 = load_x(xo_q + i, xo_k + i), load_x(xo_q + i + half, xo_k + i + half)
    second = i if "same_half_table" in mutations else i + half
    c1, c2 = load("cos", co + i), load("cos", co + second)
    s1, s2 = load("sin", so + i), load("sin", so + second)

    def rnd(v):
        return v.astype(np.float32) if "unrounded_products" in mutations else _f16_bits(_to_bits(v, bf16), bf16)

    with np.errstate(over="ignore", invalid="ignore"):
        neg = x2 if "sin_sign" in mutations else -x2
        y1 = _to_bits((rnd(x1 * c1) + rnd(neg * s1)).astype(np.float32), bf16)
        y2 = _to_bits((rnd(x2 * c2) + rnd(x1 * s2)).astype(np.float32), bf16)
    for out, sel, base in (("qo", is_q, yo_q), ("ko", ~is_q, yo_k)):
        m = mem[out]
        at = np.concatenate([m.at(base[sel] + i[sel]), m.at(base[sel] + i[sel] + half)])
        m.write_all(name, at, np.concatenate([y1[sel], y2[sel]]), grid)


def emulating(mutations=frozenset()):
    """Run rope.cu's launches on this emulator (others on the hook already installed, if any);
    a context manager yielding the ``Emulator`` (its ``launches``)."""
    return Emulator.chained(mutations)
