"""Tiny random models of each supported architecture: quantize, load, and compare to FP."""

import pytest
import torch

from helpers import tiny_config, write_model
from qconvert import load, quantize
from qconvert.source import resolve_source


@pytest.mark.parametrize("arch, tie, dtype", [("llama", True, torch.bfloat16), ("mistral", False, torch.float16),
                                             ("qwen2", False, torch.float32)])
def test_quantized_model_tracks_the_original(tmp_path, arch, tie, dtype):
    cfg = tiny_config(arch, hidden=96, intermediate=200, layers=2, vocab=128, heads=6, kv_heads=2, tie=tie)
    src = write_model(tmp_path / "src", cfg, dtype=dtype, tokenizer=False)
    out = quantize(str(src), "is-w4a8-rtn", tmp_path / "out", group_size=32, progress=False)
    model = load(out, dtype=torch.float32)
    ref = resolve_source(str(src)).load_model(torch.float32)
    if arch == "qwen2":  # q/k/v carry biases: they must survive quantization
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = model(ids).logits, ref(ids).logits
    snr_db = 10 * torch.log10(b.square().mean() / (a - b).square().mean())
    assert snr_db > 15, f"{arch}: logits SNR {snr_db:.1f} dB"
