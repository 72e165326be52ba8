"""Method plugins: code that quantizes one linear layer.

Built-ins are listed here; third parties register under the entry-point group
``qconvert.methods`` (``name = "package.module:Class"``) without touching qconvert.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from qconvert.errors import QConvertError

BUILTIN = {
    "integer-scale": "qconvert.methods.integer_scale:IntegerScaleMethod",
    "zeroquant-fp": "qconvert.methods.zeroquant_fp:ZeroQuantFPMethod",
    "quik": "qconvert.methods.quik:QuikMethod",
    "i-llm": "qconvert.methods.illm:ILLMMethod",
}


def available_methods() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group="qconvert.methods"):
        found.setdefault(ep.name, ep.value)
    return found


def get_method(name: str, params: dict):
    """Instantiate the method ``name`` with its parameters."""
    known = available_methods()
    if name not in known:
        raise QConvertError(f"unknown method {name!r}; known methods: {', '.join(sorted(known))}")
    module, _, attr = known[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(params)
