"""The calibration walk (qconvert/block_walk.py) against the model it makes, for every architecture
qconvert calibrates: in true-sequential GPTQ each linear is solved on the inputs it gets when every
linear before it (earlier blocks, and earlier stages of its own block) is already quantized, which
are exactly its inputs in a forward of the finished OUT on the calibration tokens.  So the Hessian
2 XᵀX / rows that each solve received must equal the one recomputed from the OUT's forward (float32
rounding apart).  This checks the walk's own formulas for a block (how it adds the residuals, which
norm feeds the MLP, which rotary tables and mask each layer gets) against transformers' forward of
each architecture, on tiny random models; a walk that skips a norm or mixes up a layer's mask is
caught (the control below)."""

from __future__ import annotations

import pytest
import torch

from helpers import TEXT, quantize_tiny, tiny_config, write_model
from qconvert import block_walk


def record_walk(monkeypatch):
    """What each GPTQ solve was given ({linear name: Hessian}) and the calibration tokens."""
    seen = {"hessians": {}, "tokens": None}
    init, quantize_block = block_walk.Calibrator.__init__, block_walk.Calibrator.quantize_block

    def recording_init(self, src, skeleton, names, tokens, *args, **kwargs):
        seen["tokens"] = tokens.clone()
        init(self, src, skeleton, names, tokens, *args, **kwargs)

    def recording_block(self, block, targets, solve, prepare=None):
        def recording_solve(groups):
            for g in groups:
                for name in g.names:
                    seen["hessians"][name] = g.hessian.clone()
            return solve(groups)
        return quantize_block(self, block, targets, recording_solve, prepare)

    monkeypatch.setattr(block_walk.Calibrator, "__init__", recording_init)
    monkeypatch.setattr(block_walk.Calibrator, "quantize_block", recording_block)
    return seen


def out_hessians(out, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """2 XᵀX / rows of every quantized linear's input in a forward of OUT (qconvert's CPU runtime)."""
    from qconvert import load

    model = load(out)
    sums, rows, handles = {}, {}, []
    for name, mod in model.named_modules():
        if hasattr(mod, "_dequantized"):
            def hook(m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
                rows[name] = rows.get(name, 0) + x.shape[0]
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(tokens.shape[0]):  # one sample at a time: no padding, the walk's masks
            model(tokens[i : i + 1])
    for h in handles:
        h.remove()
    return {n: (2 * sums[n] / rows[n]) for n in sums}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


ARCHS = ["llama", "phi3", "gemma2", "gemma3_text", "granite", "olmo2"]


def walk_errors(arch, tmp_path, monkeypatch) -> dict[str, float]:
    """Per quantized linear, how far the Hessian its solve got is from the OUT's (relative)."""
    (tmp_path / "calib.txt").write_text(TEXT)
    src = write_model(tmp_path / "src", tiny_config(arch, layers=3))
    seen = record_walk(monkeypatch)
    res = quantize_tiny(src, tmp_path / "out", "w4a16-gptq", "--asym-calib", "0")
    assert res.exit_code == 0, res.output + repr(res.exception)
    want = out_hessians(tmp_path / "out", seen["tokens"])
    assert set(seen["hessians"]) == set(want) and len(want) >= 3 * 4, sorted(want)
    return {n: rel(seen["hessians"][n], want[n]) for n in want}


@pytest.mark.parametrize("arch", ARCHS)
def test_each_solve_saw_the_inputs_the_out_computes(arch, tmp_path, monkeypatch):
    """Measured 2026-12-05 (benchmarks/walk_agreement.py): at most 4.2e-7 over the six architectures
    (float32 sums in other orders)."""
    errors = walk_errors(arch, tmp_path, monkeypatch)
    assert max(errors.values()) <= 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_a_walk_that_skips_gemmas_own_norms_is_caught(arch, tmp_path, monkeypatch):
    """The control: Gemma's block walked as a Llama block (post_attention_layernorm taken for the
    MLP's input norm, the attention and MLP outputs added unnormalized) feeds the MLPs and every
    later block other inputs."""
    monkeypatch.setattr(block_walk, "_block_roles", lambda block: (
        "input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "", ""))
    errors = walk_errors(arch, tmp_path, monkeypatch)
    assert max(e for n, e in errors.items() if "mlp" in n or "layers.0." not in n) > 0.05, errors
    assert max(e for n, e in errors.items() if "layers.0.self_attn" in n) <= 1e-5  # block 0's attention is untouched


def test_a_walk_that_gives_every_layer_the_first_layers_mask_is_caught(tmp_path, monkeypatch):
    """The control of the per-layer-type keyword arguments: Gemma-3's global layer (block 1) walked
    with the sliding layers' mask and rotary tables (window 8 < the 32-token samples)."""
    monkeypatch.setattr(block_walk.Calibrator, "layer_type", lambda self, index: self.layer_types[0])
    errors = walk_errors("gemma3_text", tmp_path, monkeypatch)
    assert max(e for n, e in errors.items() if "layers.1.self_attn.o_proj" in n) > 0.05, errors
    assert max(e for n, e in errors.items() if "layers.0." in n) <= 1e-5


def test_a_walk_that_skips_olmo2s_output_norms_is_caught(tmp_path, monkeypatch):
    """The control for OLMo-2: its block walked without the norms on what attention and the MLP add
    (it has no input norms: the block reads the stream as it is)."""
    monkeypatch.setattr(block_walk, "_block_roles", lambda block: ("", "self_attn", "", "mlp", "", ""))
    errors = walk_errors("olmo2", tmp_path, monkeypatch)
    assert max(e for n, e in errors.items() if "mlp" in n or "layers.0." not in n) > 0.05, errors
    assert max(e for n, e in errors.items() if "layers.0.self_attn" in n) <= 1e-5


def test_a_walk_that_drops_granites_residual_multiplier_is_caught(tmp_path, monkeypatch):
    """The control for Granite: attention's and the MLP's outputs added to the stream unscaled
    (its residual multiplier, 0.22 here as in Granite-3 8B, left out)."""
    monkeypatch.setattr(block_walk, "_block_parts", lambda block, roles: [
        getattr(block, a) if a else block_walk._identity for a in roles])
    errors = walk_errors("granite", tmp_path, monkeypatch)
    assert max(e for n, e in errors.items() if "mlp" in n or "layers.0." not in n) > 0.05, errors
    assert max(e for n, e in errors.items() if "layers.0.self_attn" in n) <= 1e-5
