"""Gemma-2 and Gemma-3 (text: ``gemma2``, ``gemma3_text``), Granite (3.x: ``granite``) and OLMo-2
(``olmo2``) through qconvert as their users run them, on tiny random models written by
transformers: quantize (Gemma's norms around attention and the MLP, alternating sliding-window and
global layers, Gemma-3's two rotary tables; Granite's embedding, residual, attention and logit
multipliers; OLMo-2's norms on what attention and the MLP add, with no input norms), the
residual-stream rotation applied where it holds (Granite) and skipped with a note where it does not,
verify (whole and streamed), eval, generate on the decode engine, the compressed-tensors export run
by transformers, and I-LLM refused before any work.  The calibration walk's inputs against the
OUT's forward: tests/test_calibration_walk.py; the decode engine against transformers' cache:
tests/test_engine.py; the rotation: tests/test_rotation.py; vLLM: tests/test_vllm.py."""

from __future__ import annotations

import json

import pytest

from helpers import (check_export_scores_as_runtime, check_illm_refused, check_tiny_out, cli_ok, quantize_tiny,
                     text_files, tiny_config, write_model)

ARCHS = ["gemma2", "gemma3_text", "granite", "olmo2"]
ROTATED = {"granite"}  # the others' norms on what attention and the MLP add do not commute with a rotation
TIED = {"gemma2", "gemma3_text", "granite"}  # as their checkpoints: the head is the embedding


def source(arch, d):
    cfg = tiny_config(arch, tie=arch in TIED)
    if arch.startswith("gemma"):
        cfg.sliding_window = 64  # within it, the decode engine runs (the walk's own test takes 8)
    return write_model(text_files(d) / "src", cfg)


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    return source(request.param, tmp_path_factory.mktemp(request.param))


def test_is_w4a8_runs_end_to_end(model, tmp_path):
    out, text = tmp_path / "out", model.parent / "text.raw"
    arch = json.loads((model / "config.json").read_text())["model_type"]
    res = cli_ok(quantize_tiny(model, out, "is-w4a8"))
    report = json.loads((out / "qconvert.json").read_text())
    if arch in ROTATED:
        assert "residual stream rotated" in res.output and report["rotation"]["mode"] == "hadamard"
    else:
        assert f"does not apply (rotation does not support model type {arch!r}" in res.output
        assert "rotation" not in report and report["rotation_skipped"], sorted(report)
    names = {row["name"] for row in report["layers"]}
    assert {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"} <= names
    check_tiny_out(out, model, text)


def test_the_export_runs_in_transformers_as_the_runtime_scores(model, tmp_path):
    check_export_scores_as_runtime(model, tmp_path)


def test_illm_is_refused_before_any_work(model, tmp_path):
    check_illm_refused(model, tmp_path)


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - ROTATED))
def test_an_explicit_rotation_is_refused_with_the_fix(arch, tmp_path):
    res = quantize_tiny(source(arch, tmp_path), tmp_path / "out", "is-w4a8", "--rotate", "hadamard")
    assert res.exit_code != 0 and "convert without --rotate" in res.output and not (tmp_path / "out").exists()
