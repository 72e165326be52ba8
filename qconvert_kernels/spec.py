"""How a kernel family declares its CUDA sources (in its ``__init__.py``, as ``SOURCES``).

``qconvert_kernels.compile.discover()`` walks the family folders and collects these, so the build
checks (``python -m qconvert_kernels.report``, tests/test_kernels_families.py) cover a new family
as soon as its folder declares its sources; nothing lists the families by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ARCHS = ("sm_80", "sm_89", "sm_90")


@dataclass(frozen=True)
class KernelSource:
    """One .cu file of a family.

    kernels      every extern "C" entry point the file defines (the module's complete list)
    gemms        the entry points that must run on tensor cores
    archs        the architectures it is built and checked for
    mma          SASS opcode prefixes of the tensor-core instruction the GEMMs use (any matches)
    mma_count    {kernel: {arch: {opcode: count}}} exact tensor-core instruction counts, where pinned
    no_mma_on    {kernel: archs} GEMMs that have no tensor-core instruction on those archs (emulated
                 by ptxas there: QUIK's int4 mma on sm_90; the launcher takes another path)
    no_float     kernels whose SASS must hold no float-unit instruction at all (integer-only code)
    """

    family: str
    path: Path
    kernels: tuple[str, ...]
    gemms: tuple[str, ...] = ()
    archs: tuple[str, ...] = DEFAULT_ARCHS
    mma: tuple[str, ...] = ("IMMA",)
    mma_count: dict = field(default_factory=dict)
    no_mma_on: dict = field(default_factory=dict)
    no_float: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.family}/{self.path.name}"

    def uses_mma(self, kernel: str, arch: str) -> bool:
        return kernel in self.gemms and arch not in self.no_mma_on.get(kernel, ())
