"""On-disk layouts of quantized linears: one file per layout family, one registry.

``get_layout(name)`` returns the ``Layout`` (qconvert/layouts/base.py) that stores, checks,
runs, exports and describes a layer of that layout; ``runtime.load``, ``verify``, ``inspect``,
``bench``, ``push`` and ``export`` ask it instead of branching on names.

Built-in families: ``int4`` (w4a8-is, w4a8-fs, w4a16, w4a16-zp), ``fp8`` (fp4-fp8, fp8-fp8), ``int8``
(w8a8), ``quik`` (quik-w4a4, quik-w8a8), ``illm`` (illm-w8a8, illm-w4a8, illm-w4a4).  A third
party adds a layout without touching qconvert: an entry point in the group ``qconvert.layouts``
whose name is the layout name and whose value (``package.module:OBJECT``) is a ``Layout``
instance.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points

from qconvert.errors import QConvertError
from qconvert.layouts.base import Layout, NotExportable, QuantizedModule, TensorSpec

__all__ = ["Layout", "NotExportable", "QuantizedModule", "TensorSpec", "available_layouts", "get_layout"]

BUILTIN = {
    "w4a8-is": "qconvert.layouts.int4:W4A8_IS",
    "w4a8-fs": "qconvert.layouts.int4:W4A8_FS",
    "w4a16": "qconvert.layouts.int4:W4A16",
    "w4a16-zp": "qconvert.layouts.int4:W4A16_ZP",
    "fp4-fp8": "qconvert.layouts.fp8:FP4_FP8",
    "fp8-fp8": "qconvert.layouts.fp8:FP8_FP8",
    "w8a8": "qconvert.layouts.int8:W8A8",
    "quik-w4a4": "qconvert.layouts.quik:QUIK_W4A4",
    "quik-w8a8": "qconvert.layouts.quik:QUIK_W8A8",
    "illm-w8a8": "qconvert.layouts.illm:ILLM_W8A8",
    "illm-w4a8": "qconvert.layouts.illm:ILLM_W4A8",
    "illm-w4a4": "qconvert.layouts.illm:ILLM_W4A4",
}


def available_layouts() -> dict[str, str]:
    """Layout name -> "module:object", built-ins first, then entry points (which cannot
    replace a built-in)."""
    found = dict(BUILTIN)
    for ep in entry_points(group="qconvert.layouts"):
        found.setdefault(ep.name, ep.value)
    return found


@functools.lru_cache(maxsize=None)
def _load(name: str, target: str) -> Layout:
    module, _, attr = target.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    if not isinstance(obj, Layout) or obj.name != name:
        raise QConvertError(f"layout plugin {target} does not provide a Layout named {name!r}; fix its entry point")
    return obj


def get_layout(name: str, where: str = "") -> Layout:
    """The layout ``name``; an unknown one fails with the list of the known ones."""
    known = available_layouts()
    if name not in known:
        prefix = f"{where}: " if where else ""
        raise QConvertError(f"{prefix}layout {name!r} is unknown to this qconvert (known: {', '.join(sorted(known))}); "
                            "upgrade qconvert or install the plugin that provides it")
    return _load(name, known[name])
