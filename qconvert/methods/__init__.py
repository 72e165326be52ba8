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
    "int8": "qconvert.methods.int8:Int8Method",
}


def available_methods() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group="qconvert.methods"):
        found.setdefault(ep.name, ep.value)
    return found


def method_class(name: str):
    """The plugin class of method ``name``; an unknown name fails with the list of the known ones."""
    known = available_methods()
    if name not in known:
        raise QConvertError(f"unknown method {name!r}; known methods: {', '.join(sorted(known))}")
    module, _, attr = known[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def method_parameters(name: str) -> tuple[str, ...]:
    """The parameter names method ``name``'s config accepts."""
    return tuple(getattr(method_class(name).config_class, "__dataclass_fields__", ()))


def get_method(name: str, params: dict):
    """Instantiate the method ``name`` with its parameters."""
    return method_class(name)(params)
