"""Phi-3 (model type ``phi3``: q, k and v in one ``qkv_proj``, gate and up in one
``gate_up_proj``) through qconvert as its users run it, on a tiny random Phi-3 written by
transformers: quantize with each family of schemes (the presets' rotation included), verify
(whole and streamed), eval, generate on the decode engine, the compressed-tensors export run by
transformers, and I-LLM refused before any work (its integer runtime runs Llama-style models only).
The rotation's exactness on Phi-3 is in tests/test_rotation.py."""

from __future__ import annotations

import json
import math

import pytest

from helpers import TEXT, quantize_tiny, run_cli, tiny_config, write_model


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    d = tmp_path_factory.mktemp("phi3")
    (d / "calib.txt").write_text(TEXT)
    return write_model(d / "src", tiny_config("phi3"))


def _ok(res):
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def _eval(path, text):
    return json.loads(run_cli("eval", path, "--data-file", text, "--seqlen", 32, "--max-windows", 3, "--json", "-q").stdout)


def test_is_w4a8_preset_rotates_and_runs_end_to_end(phi3, tmp_path):
    """The preset's defaults (residual stream rotated, norms folded, GPTQ): the fused projections
    are quantized as they are, and the OUT verifies, scores close to the float model and decodes."""
    out, text = tmp_path / "out", tmp_path / "text.raw"
    text.write_text(TEXT)
    _ok(quantize_tiny(phi3, out, "is-w4a8"))
    report = json.loads((out / "qconvert.json").read_text())
    assert report["rotation"]["mode"] == "hadamard", report.get("rotation")
    names = {row["name"] for row in report["layers"]}
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.gate_up_proj", "model.layers.1.mlp.down_proj",
            "model.layers.0.self_attn.o_proj"} <= names, sorted(names)[:6]
    assert not any(n.endswith(("q_proj", "gate_proj")) for n in names)
    for stream in ("--no-stream", "--stream"):
        run_cli("verify", out, "--data-file", text, stream)
    q, f = _eval(out, text), _eval(phi3, text)
    assert math.isfinite(q["perplexity"]) and q["perplexity"] <= 1.5 * f["perplexity"], (q, f)
    res = run_cli("generate", out, "--prompt", "hello world", "--max-new-tokens", 3, "--device", "cpu")
    assert "prefill" in res.output


@pytest.mark.parametrize("scheme, extra", [
    ("quik-w4a4", ()), ("zqfp-w4a8", ()), ("w8a8", ()), ("w4a16-gptq", ()),
    ("is-w4a8", ("--rotate", "hadamard+online")),  # down_proj's input rotated at run time
])
def test_other_schemes_quantize_and_verify(phi3, tmp_path, scheme, extra):
    out = tmp_path / "out"
    _ok(quantize_tiny(phi3, out, scheme, *extra))
    run_cli("verify", out)
    if extra:
        rotation = json.loads((out / "qconvert.json").read_text())["rotation"]
        assert rotation["online"]["modules"] == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)], rotation
        assert "qkv_proj's value rows" in rotation["per_head"] and "qkv_proj" in " ".join(rotation["folded"])


def test_the_export_runs_in_transformers_as_the_runtime_scores(phi3, tmp_path):
    """W4A16 has no activation quantization: transformers (compressed-tensors) scores the export
    as qconvert's runtime scores the OUT, to float32 rounding."""
    out, dest, text = tmp_path / "out", tmp_path / "ct", tmp_path / "text.raw"
    text.write_text(TEXT)
    _ok(quantize_tiny(phi3, out, "w4a16-gptq"))
    run_cli("export", out, "-o", dest)
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    c, q = _eval(dest, text), _eval(out, text)
    assert c["kind"] == "compressed-tensors" and abs(c["perplexity"] - q["perplexity"]) <= 1e-5 * q["perplexity"], (c, q)


@pytest.mark.parametrize("scheme", ["illm-w8a8", "illm-w4a8"])
def test_illm_is_refused_before_any_work(phi3, tmp_path, scheme):
    out = tmp_path / "out"
    res = quantize_tiny(phi3, out, scheme)
    assert res.exit_code != 0
    assert "I-LLM's integer runtime runs Llama-style models (llama, mistral, qwen2); phi3 is not one" in res.output
    assert "choose another scheme" in res.output and not out.exists()


def test_illm_refuses_a_llama_with_scaled_rope_before_any_work(tmp_path):
    """A Llama-3.1-style rope_type "llama3": the integer runtime has plain rotary embeddings only,
    so quantize says so at once instead of writing an OUT that would not load."""
    cfg = tiny_config()
    cfg.rope_parameters = {**(cfg.rope_parameters or {}), "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (tmp_path / "calib.txt").write_text(TEXT)
    src = write_model(tmp_path / "src", cfg)
    res = quantize_tiny(src, tmp_path / "out", "illm-w8a8")
    assert res.exit_code != 0 and "plain rotary embeddings only; this model uses rope_type 'llama3'" in res.output
    assert not (tmp_path / "out").exists()
