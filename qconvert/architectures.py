"""The model architectures qconvert reads: which, and where their decoder blocks live.

A leaf module (it imports nothing else of qconvert's) so that the source readers, the model
skeleton and the mixture-of-experts helpers can all use it without importing each other.
"""

from __future__ import annotations

from qconvert.errors import QConvertError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "granite", "olmo2",
                         "mixtral", "qwen2_moe", "qwen3_moe")
DECODER_LAYERS = "model.layers"  # where these architectures keep their decoder blocks


def check_architecture(config) -> None:
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise QConvertError(
            f"the source is already quantized (quantization_config with quant_method {method!r}); "
            "qconvert needs the original floating-point checkpoint"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QConvertError(
            f"unsupported architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
