"""What the CPU reference derives from a layer's packed weights, kept within a memory budget.

The CPU runtime of a quantized linear multiplies with tensors it derives from the stored ones:
the int4 codes unpacked to int8 (1 byte per weight, from half a byte), and for the W4A8
layouts also their float32 copy in the group order of the GEMM (4 bytes per weight), the FP4
codes as float groups, a weight-only layer dequantized.  Made once per layer and kept, they
cost 5 bytes per weight in all: about 35 GB for a Llama-3-8B at W4A8, on top of the model.

So they are kept in one process-wide cache with a byte budget: when an entry would overflow
it, the least recently used ones are dropped (a layer's next call derives them again; its
results are the same, only slower).  A model whose derived tensors fit the budget runs as if
every layer kept its own; one that does not fit runs in bounded memory.  An entry larger than
the whole budget is used once and not kept.

The budget is ``QCONVERT_CPU_CACHE`` (a size such as ``8GB``, or ``0`` to keep nothing) when
set, else a quarter of the RAM free when the first entry is made.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from typing import Callable

import torch

ENV = "QCONVERT_CPU_CACHE"


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class DerivedCache:
    """Least-recently-used derived tensors of many modules, at most ``budget`` bytes in all."""

    def __init__(self, budget: int | None = None):
        self._budget = budget
        self._order: OrderedDict = OrderedDict()  # (id(module), key) -> (weakref to the module, key, bytes)
        self.used = 0

    @property
    def budget(self) -> int:
        if self._budget is None:
            self._budget = budget_from_environment()
        return self._budget

    def fetch(self, module, key, make: Callable):
        """``module``'s derived value ``key``: kept from before, or ``make()`` (kept if it fits)."""
        store = module.__dict__.setdefault("_derived", {})
        slot = (id(module), key)
        if key in store:
            self._order.move_to_end(slot)
            return store[key]
        value = make()
        size = _nbytes(value)
        if size > self.budget:
            return value
        while self._order and self.used + size > self.budget:
            self._drop(*self._order.popitem(last=False))
        store[key] = value
        # a module that is freed takes its entries with it: its weakref's callback gives back their bytes
        ref = weakref.ref(module, lambda _, slot=slot: self._forget(slot))
        self._order[slot] = (ref, key, size)
        self.used += size
        return value

    def _drop(self, slot, entry) -> None:
        ref, key, size = entry
        module = ref()
        if module is not None:
            module.__dict__.get("_derived", {}).pop(key, None)
        self.used -= size

    def _forget(self, slot) -> None:
        for s in [s for s in self._order if s[0] == slot[0]]:
            self.used -= self._order.pop(s)[2]

    def clear(self) -> None:
        while self._order:
            self._drop(*self._order.popitem(last=False))


def budget_from_environment() -> int:
    from qconvert.errors import QConvertError
    from qconvert.fsutil import parse_size
    from qconvert.placement import free_ram

    text = os.environ.get(ENV)
    if text is None or not text.strip():
        return free_ram() // 4
    try:
        return parse_size(text.strip())
    except QConvertError:
        raise QConvertError(f"{ENV}={text!r} is not a size; set it like {ENV}=8GB (or 0 to keep nothing)") from None


CACHE = DerivedCache()
