"""What the CPU reference derives from a layer's packed weights, kept within a memory budget.

The CPU runtime of a quantized linear multiplies with tensors it derives from the stored ones:
the int4 codes unpacked to int8 (1 byte per weight, from half a byte), and for the W4A8
layouts also their float32 copy in the group order of the GEMM (4 bytes per weight), the FP4
codes as float groups, a weight-only layer dequantized, I-LLM's int8 weights and head as float32
for its exact float32 GEMMs (on CPUs without AVX512-VNNI).  Made once per layer and kept,
they cost up to 5 bytes per weight in all: about 35 GB for a Llama-3-8B at W4A8, on top of the
model.  An entry is made from the tensors a module holds when it is first asked for; it is
dropped when the module moves (``_apply``), not when its tensors are changed in place.

So they are kept in one process-wide cache with a byte budget: when an entry would overflow
it, the least recently used ones are dropped (a layer's next call derives them again; its
results are the same, only slower).  A model whose derived tensors fit the budget runs as if
every layer kept its own; one that does not fit runs in bounded memory.  An entry larger than
the whole budget is used once and not kept.

The budget is ``QCONVERT_CPU_CACHE`` (a size such as ``8GB``, or ``0`` to keep nothing) when
set, else a quarter of the available RAM when the first entry is made.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

ENV = "QCONVERT_CPU_CACHE"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _nbytes(value) -> int:
    """The bytes ``value`` keeps alive: its tensors' storages (a view keeps all of its base)."""
    return sum(t.untyped_storage().nbytes() for t in _tensors(value))


def _in_ram(value) -> bool:
    return all(t.device.type == "cpu" for t in _tensors(value))


class DerivedCache:
    """Least-recently-used derived tensors of many modules, at most ``budget`` bytes in all.

    A value made on a GPU (a weight-only layer dequantized there) is kept with its module outside
    the budget, which is for RAM.  A module moved to another device or dtype drops its entries
    (``release``, from ``QuantizedModule._apply``); one copied keeps none it can find here, and
    makes its own."""

    def __init__(self, budget: int | None = None):
        self._budget = budget
        self._order: OrderedDict = OrderedDict()  # (id(module), key) -> (weakref to the module, key, bytes)
        self._lock = threading.RLock()  # reentrant: a ``make`` may fetch another entry of its module
        self.used = 0
        self.dropped = 0  # entries evicted for room, over the cache's life

    @property
    def budget(self) -> int:
        if self._budget is None:
            self._budget = budget_from_environment()
        return self._budget

    def fetch(self, module, key, make: Callable):
        """``module``'s derived value ``key``: kept from before, or ``make()`` (kept if it fits)."""
        with self._lock:
            store = module.__dict__.setdefault("_derived", {})
            slot = (id(module), key)
            if slot in self._order and key in store:
                self._order.move_to_end(slot)
                return store[key]
            if key in store and not _in_ram(store[key]):
                return store[key]
            value = make()
            if not _in_ram(value):
                store[key] = value
                return value
            size = _nbytes(value)
            if size > self.budget:
                store.pop(key, None)
                return value
            while self._order and self.used + size > self.budget:
                self._drop(*self._order.popitem(last=False))
                self.dropped += 1
            store[key] = value
            # a module that is freed takes its entries with it: its weakref's callback gives back their bytes
            ref = weakref.ref(module, lambda _, slot=slot: self._forget(slot[0]))
            self._order[slot] = (ref, key, size)
            self.used += size
            return value

    def _drop(self, slot, entry) -> None:
        ref, key, size = entry
        module = ref()
        if module is not None:
            module.__dict__.get("_derived", {}).pop(key, None)
        self.used -= size

    def _forget(self, owner: int) -> None:
        with self._lock:
            for s in [s for s in self._order if s[0] == owner]:
                self.used -= self._order.pop(s)[2]

    def release(self, module) -> None:
        """Drop every entry of ``module`` (it is moving to another device or dtype)."""
        with self._lock:
            self._forget(id(module))
            module.__dict__.pop("_derived", None)

    def clear(self) -> None:
        with self._lock:
            while self._order:
                self._drop(*self._order.popitem(last=False))


def budget_from_environment() -> int:
    from qconvert.errors import QConvertError
    from qconvert.fsutil import parse_size
    from qconvert.placement import available_ram

    text = os.environ.get(ENV)
    if text is None or not text.strip():
        return available_ram() // 4
    try:
        return parse_size(text.strip(), allow_zero=True)
    except QConvertError:
        raise QConvertError(f"{ENV}={text!r} is not a size; set it like {ENV}=8GB (or 0 to keep nothing)") from None


CACHE = DerivedCache()


class DerivedHolder(nn.Module):
    """A module that keeps what it derives from its tensors in ``CACHE`` (the quantized layers, I-LLM's
    integer model), and drops it when it moves to another device or dtype."""

    def derived(self, key, make: Callable):
        """A tensor derived from this module's stored ones (unpacked codes, float groups, float32
        copies), made by ``make()`` and kept within the process's budget."""
        return CACHE.fetch(self, key, make)

    def _apply(self, fn, *args, **kwargs):
        CACHE.release(self)  # derived from the tensors as they were: made again after the move
        return super()._apply(fn, *args, **kwargs)
