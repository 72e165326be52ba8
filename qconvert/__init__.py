"""qconvert: quantize a Hugging Face causal LM, check it, measure it, publish it.

``qconvert.quantize(source, scheme, out)`` (qconvert.pipeline.quantize) and ``qconvert.load(out)``
(qconvert.runtime.load) are the Python entry points (``qconvert.CalibSettings`` is ``quantize``'s
``calib=``, which also takes a dict of its fields); they are imported on first use, so ``import
qconvert`` stays light, and are the functions themselves (``help(qconvert.load)`` shows their
parameters)."""

__version__ = "0.3.0"

_LAZY = {"quantize": "qconvert.pipeline", "load": "qconvert.runtime", "CalibSettings": "qconvert.calibration_text"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qconvert' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
