"""Thread-exact CPU emulator of kvcache.cu (run through ``qconvert_kernels.launch.launch_hook``).

Every thread of the launch's grid runs the kernel's own index math, vectorized over all of them:
the head blockIdx.y * blockDim.y + threadIdx.y and its bound, the token t = blockIdx.x and row
b = blockIdx.z, the element i = threadIdx.x and its two bounds (Dk, Dv), the column read from
``cols`` and its bound, and the addresses from the int64 stride arguments.  Memory is what the
launcher passed (``launch.ViewMemory``): each tensor's whole storage, so a read or a write lands
where the kernel's would, and each is checked to fall on an element of that tensor's own view.
No cache element may be written twice in a launch (two tokens given one column, or a stride
mixed up), nothing but the written columns changes, and no cache may overlap a source or share
memory with the other cache (the kernel's ``__restrict__``).

    with emulate.emulating():
        qconvert_kernels.kvcache.cuda.kv_write(k, v, cols, k_cache, v_cache)

``emulating()`` inside another emulator's hook hands the launches that are not kvcache.cu's to it.
``mutations`` are deliberate kernel bugs (``MUTATIONS``) for the tests that show it can fail.
"""

from __future__ import annotations

import numpy as np

from qconvert_kernels import launch

MAX_THREADS = 1024
MAX_GRID_YZ = 65535
# kvcache.cu's KV_ARGS, in order, with the numpy type each must be passed as (CuPy packs an
# argument by its type: an int32 where the kernel reads a long long would shift every later one)
PARAMS = ("k", "v", "cols", "kc", "vc", "heads", "dk", "dv", "len", "kb", "kh", "kt", "vb", "vh", "vt",
          "kcb", "kch", "kcl", "vcb", "vch", "vcl")
PARAM_TYPES = (np.uint64,) * 5 + (np.int32,) * 3 + (np.int64,) * 13
KERNELS = ("kv_write",)
MUTATIONS = frozenset({
    "token_as_column",   # writes token t to column t, not cols[t] (right only for a prefill from column 0)
    "v_with_k_strides",  # v read through k's strides
    "value_bound_dk",    # the value's bound i < Dk: wrong where the head sizes differ
    "no_column_bound",   # a column past L - 1 written (into the next head's or row's columns)
    "spare_threads",     # the bound head > H: a spare head row reads past the last head
})


class Emulator(launch.ChainedEmulator):
    """The launch hook: emulates kvcache.cu's launches, hands others to ``inner`` (or refuses them)."""

    FAMILY, KERNELS, MUTATIONS = "kvcache", KERNELS, MUTATIONS

    def emulate(self, name, grid, block, args, shared_mem):
        self.check_arg_types(name, args, PARAMS, PARAM_TYPES)
        if len(block) != 2 or block[0] * block[1] > MAX_THREADS or int(block[0]) != max(int(args[6]), int(args[7])) \
                or shared_mem:
            raise AssertionError(f"{name}: launched with {block} threads and {shared_mem} bytes of shared memory; "
                                 f"the kernel is written for (max(Dk, Dv), H') threads, at most {MAX_THREADS}, and none")
        self.check_grid(name, grid, 3, MAX_GRID_YZ)
        run(name, grid, block, args, self.mutations)
        return name, grid, block


def run(name: str, grid: tuple, block: tuple, args: tuple, mutations=frozenset()) -> None:
    pk, pv, pcols, pkc, pvc, heads, dk, dv, length, *strides = args
    heads, dk, dv, length = int(heads), int(dk), int(dv), int(length)
    kb, kh, kt, vb, vh, vt, kcb, kch, kcl, vcb, vch, vcl = (np.int64(s) for s in strides)
    mem = {n: launch.ViewMemory(n, int(p), 2) for n, p in (("k", pk), ("v", pv), ("kc", pkc), ("vc", pvc))}
    cols = launch.ViewMemory("cols", int(pcols), 8)
    for out in ("kc", "vc"):
        for inp in ("k", "v"):
            if mem[out].overlaps(mem[inp]):
                raise AssertionError(f"{name}: {out} overlaps {inp} (the kernel's pointers are __restrict__)")
        if mem[out].storage == cols.storage:
            raise AssertionError(f"{name}: {out} shares memory with cols")
    if mem["kc"].storage == mem["vc"].storage:
        raise AssertionError(f"{name}: kc and vc share memory (the kernel's pointers are __restrict__)")

    # every thread of the grid: blockIdx (x, y, z), threadIdx (x, y)
    axes = [np.arange(int(n), dtype=np.int64) for n in (grid[0], grid[1], grid[2], block[0], block[1])]
    t, y, b, i, j = (a.reshape(-1) for a in np.meshgrid(*axes, indexing="ij"))
    head = y * int(block[1]) + j
    live = head <= heads if "spare_threads" in mutations else head < heads
    t, b, i, head = t[live], b[live], i[live], head[live]
    col = t.copy() if "token_as_column" in mutations else cols.words[cols.at(t)]
    keep = np.ones_like(col, bool) if "no_column_bound" in mutations else (col >= 0) & (col < length)
    t, b, i, head, col = t[keep], b[keep], i[keep], head[keep], col[keep]
    vstr = (kb, kh, kt) if "v_with_k_strides" in mutations else (vb, vh, vt)
    vbound = dk if "value_bound_dk" in mutations else dv
    for src, dst, bound, (sb, sh, st), (db, dh, dl) in (("k", "kc", dk, (kb, kh, kt), (kcb, kch, kcl)),
                                                        ("v", "vc", vbound, vstr, (vcb, vch, vcl))):
        sel = i < bound
        s, d = mem[src], mem[dst]
        vals = s.words[s.at(b[sel] * sb + head[sel] * sh + t[sel] * st + i[sel])]
        at = d.at(b[sel] * db + head[sel] * dh + col[sel] * dl + i[sel])
        if len(np.unique(at)) != len(at):
            raise AssertionError(f"{name}: {dst} has elements written more than once (grid {grid})")
        d.words[at] = vals


def emulating(mutations=frozenset()):
    """Run kvcache.cu's launches on this emulator (others on the hook already installed, if any);
    a context manager yielding the ``Emulator`` (its ``launches``)."""
    return Emulator.chained(mutations)
