"""qconvert: quantize a Hugging Face causal LM, check it, measure it, publish it."""

__version__ = "0.3.0"


def quantize(*args, **kwargs):
    """See ``qconvert.pipeline.quantize``."""
    from qconvert.pipeline import quantize as _quantize

    return _quantize(*args, **kwargs)


def load(*args, **kwargs):
    """See ``qconvert.runtime.load``."""
    from qconvert.runtime import load as _load

    return _load(*args, **kwargs)
