"""Gemma-2 and Gemma-3 (text: model types ``gemma2``, ``gemma3_text``) through qconvert as their
users run them, on tiny random models written by transformers: quantize (their norms around
attention and the MLP, alternating sliding-window and global layers, Gemma-3's two rotary tables;
the residual-stream rotation does not apply and says so), verify (whole and streamed), eval,
generate on the decode engine, the compressed-tensors export run by transformers, and I-LLM refused
before any work.  The calibration walk's inputs against the OUT's forward: tests/test_calibration_walk.py;
the decode engine against transformers' cache: tests/test_engine.py; vLLM: tests/test_vllm.py."""

from __future__ import annotations

import json

import pytest

from helpers import check_tiny_out, cli_ok, eval_tiny, quantize_tiny, run_cli, text_files, tiny_config, write_model

ARCHS = ["gemma2", "gemma3_text"]


@pytest.fixture(scope="module", params=ARCHS)
def gemma(request, tmp_path_factory):
    d = text_files(tmp_path_factory.mktemp(request.param))
    cfg = tiny_config(request.param, tie=True)  # Gemma ties its head to the embedding
    cfg.sliding_window = 64  # within it, the decode engine runs (the walk's own test takes 8)
    return write_model(d / "src", cfg)


def test_is_w4a8_runs_end_to_end_unrotated(gemma, tmp_path):
    out, text = tmp_path / "out", gemma.parent / "text.raw"
    res = cli_ok(quantize_tiny(gemma, out, "is-w4a8"))
    assert "does not apply (rotation does not support model type" in res.output
    report = json.loads((out / "qconvert.json").read_text())
    assert "rotation" not in report and report["rotation_skipped"], sorted(report)
    names = {row["name"] for row in report["layers"]}
    assert {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"} <= names
    check_tiny_out(out, gemma, text)


def test_the_export_runs_in_transformers_as_the_runtime_scores(gemma, tmp_path):
    out, dest, text = tmp_path / "out", tmp_path / "ct", gemma.parent / "text.raw"
    cli_ok(quantize_tiny(gemma, out, "w4a16-gptq"))
    run_cli("export", out, "-o", dest)
    c, q = eval_tiny(dest, text), eval_tiny(out, text)
    assert c["kind"] == "compressed-tensors" and abs(c["perplexity"] - q["perplexity"]) <= 1e-5 * q["perplexity"], (c, q)


def test_illm_is_refused_before_any_work(gemma, tmp_path):
    res = quantize_tiny(gemma, tmp_path / "out", "illm-w8a8")
    assert res.exit_code != 0 and "I-LLM's integer runtime runs Llama-style models" in res.output
    assert not (tmp_path / "out").exists()


def test_an_explicit_rotation_is_refused_with_the_fix(gemma, tmp_path):
    res = quantize_tiny(gemma, tmp_path / "out", "is-w4a8", "--rotate", "hadamard")
    assert res.exit_code != 0 and "convert without --rotate" in res.output and not (tmp_path / "out").exists()
