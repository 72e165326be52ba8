"""``python -m qconvert_kernels.report sm_80 sm_89 sm_90``: build every discovered kernel source
exactly as the launchers do (``qconvert_kernels.launch.build``) and print, per kernel, the ptxas
resources and the SASS summary (tensor-core instructions, FTZ, local memory).  A GPU is not needed.
"""

from __future__ import annotations

import sys

from qconvert_kernels import launch
from qconvert_kernels.compile import (ARCHS, cuobjdump_path, discover, kernel_sass, local_memory_ops, opcodes,
                                      parse_ptxas, sass)


def _report(arch: str, cubin, log: str, src) -> bool:
    """Print ptxas resources and the SASS summary of ``src``'s kernels in ``cubin``; True if none
    spills, uses local memory, holds an FTZ instruction, or (a GEMM) lacks its tensor-core opcode."""
    res = parse_ptxas(log)
    per_kernel = kernel_sass(sass(cubin)) if cuobjdump_path() else {}
    ok = True
    for name in src.kernels:
        r = res.get(name, {})
        text = per_kernel.get(name, "")
        ops = opcodes(text)
        mma = sum(v for k, v in ops.items() if k.startswith(src.mma))
        ftz = sum(v for k, v in ops.items() if ".FTZ" in k)
        local = local_memory_ops(text)
        bad = (r.get("spill_stores", 1) or r.get("spill_loads", 1) or local or ftz
               or (per_kernel and src.uses_mma(name, arch) and not mma))
        ok &= not bad
        print(f"{arch} {src.name:26s} {name:34s} regs={r.get('registers')} smem={r.get('smem')} stack={r.get('stack')} "
              f"spills={r.get('spill_stores')}/{r.get('spill_loads')} MMA={mma} FTZ={ftz} local={local or 0}"
              f"{'  <-- FAIL' if bad else ''}")
    return ok


def main(argv=None) -> int:
    """Build every discovered kernel source for the given archs exactly as the launchers do
    (qconvert_kernels.launch.build) and print the ptxas / SASS summary."""
    archs = (argv if argv is not None else sys.argv[1:]) or list(ARCHS)
    ok = True
    for arch in archs:
        for src in discover():
            if arch not in src.archs:
                continue
            cubin = launch.build(src.path, arch)
            ok &= _report(arch, cubin, launch.build_log(cubin), src)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
