"""One repacked W4A8 linear on the GPU against the CPU reference, in a process of its own per case
(a device fault poisons the CUDA context): ``python benchmarks/gpu_probe.py M N K LAYOUT [VARIANT]``
prints one line; ``python benchmarks/gpu_probe.py --sweep`` runs the cases below (decode, and the
g = 128 prefill), 8 at a time, one line each (``rc=0 OK ...`` when the kernel ran and equals the
reference bit for bit; gpu_check.sh, part a).  Variants change the launch plan: s1 (no split-K), a1
(one amax publisher).  Written on 2026-12-04 to find which decode kernels faulted on an H200
(docs/benchmarks.md).  Variant bm64: the prefill on 64-token tiles (two CTAs per SM, 2026-12-06)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def one(m, n, k, layout, variant="base"):
    import torch
    sys.path.insert(0, "tests")
    from test_kernels_w4a8_emulate import activations, make_layer
    from qconvert_kernels.w4a8 import cuda, reference as ref
    g = 128
    dev = torch.device("cuda")
    tensors = make_layer(n, k, g, layout, 1234 + m)
    x = activations(m, k, torch.float16, 99 + m)
    prep = cuda.prepare(layout, {a: b.to(dev) for a, b in tensors.items()}, g, dev)
    orig = cuda.plan
    bm = 64 if variant == "bm64" else cuda.P_BM
    def plan(mm, p, sms, prefill_bm=cuda.P_BM, ctas=None):
        pl = orig(mm, p, sms, prefill_bm, ctas)
        if variant == "s1" and pl.kind == "decode":
            pl = dataclasses.replace(pl, grid=(1, pl.grid[1]), splits=1, gq=p.n_groups, gr=0, part_int4=0,
                                     amax_ctas=1, ak_log2=max(3, (p.k - 1).bit_length()))
        if variant == "a1" and pl.kind == "decode":
            pl = dataclasses.replace(pl, amax_ctas=1, ak_log2=max(3, (p.k - 1).bit_length()))
        return pl
    cuda.plan = plan
    y = cuda.linear(x.to(dev), prep, prefill_bm=bm)
    torch.cuda.synchronize()
    pl = plan(m, prep, torch.cuda.get_device_properties(0).multi_processor_count, bm, cuda.prefill_ctas(dev, bm))
    want = ref.linear_reference(x, layout, tensors, g, bounds=pl.split_bounds())
    same = torch.equal(y.cpu().view(torch.int16), want.view(torch.int16))
    print(f"{'OK' if same else 'MISMATCH'} {pl.kernel} grid={pl.grid} A={pl.amax_ctas} ak={pl.ak_log2}")


CASES = ([(m, 4096, 4096, "w4a8-is", "base") for m in (1, 2, 8, 9, 12, 16, 17, 24, 32, 33, 48, 64)]
         + [(m, 4096, 4096, "w4a8-fs", "base") for m in (1, 9, 16, 32, 64)]
         + [(m, 576, 576, l, "base") for m in (1, 8, 9, 16, 32, 64) for l in ("w4a8-is", "w4a8-fs")]
         + [(16, 4096, 4096, "w4a8-is", v) for v in ("s1", "a1")] + [(16, 576, 576, "w4a8-is", v) for v in ("s1", "a1")]
         + [(64, 4096, 4096, "w4a8-is", v) for v in ("s1", "a1")] + [(16, 136, 256, "w4a8-is", "base")]
         # the prefill kernels' g = 128 stage loop (2026-12-04, not yet run on a GPU)
         + [(m, 4096, 4096, l, "base") for m in (65, 256) for l in ("w4a8-is", "w4a8-fs")]
         # the 64-token prefill tiles (2026-12-06, not yet run on a GPU)
         + [(m, 4096, 4096, l, "bm64") for m in (65, 256) for l in ("w4a8-is", "w4a8-fs")])


def sweep():
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing probed")
        return

    def run(c):
        p = subprocess.run([sys.executable, __file__, *map(str, c)], capture_output=True, text=True, timeout=120)
        last = (p.stdout.strip().splitlines() or [""])[-1]
        err = [l for l in p.stderr.splitlines() if "Error" in l][-1:] if p.returncode else []
        return f"{' '.join(map(str, c)):32s} rc={p.returncode} {last} {' '.join(err)[:160]}"
    subprocess.run([sys.executable, __file__, "1", "576", "576", "w4a8-is"], capture_output=True, timeout=300)  # compile once
    with ThreadPoolExecutor(8) as ex:
        for line in ex.map(run, CASES):
            print(line, flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--sweep"]:
        sweep()
    else:
        m, n, k, layout = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        one(m, n, k, layout, sys.argv[5] if len(sys.argv) > 5 else "base")
