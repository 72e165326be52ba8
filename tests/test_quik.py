"""QUIK: outlier selection, GPTQ with the outlier columns kept last, the split activation
quantizer and GEMM reference, the QuikLinear runtime, and the presets end to end (tiny Llama
through the CLI, and the real SmolLM2)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from helpers import quantize_tiny
from qconvert.cli import cli
from qconvert.errors import QConvertError
from qconvert.solvers.gptq import gptq, relative_output_error
from qconvert.solvers.grids import IntGrid
from qconvert.methods.quik import QuikMethod, auto_outliers
from qconvert.layouts.quik import QuikLinear
from qconvert_kernels.quik import reference as refq


def _problem(n=96, k=256, rows=2048, outliers=(5, 77, 200), seed=0):
    """Inputs with a few outlier channels (as in LLM activations) and their Hessian."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k))
    x[:, list(outliers)] *= 40
    w = torch.randn(n, k, generator=g) * 0.05
    return w, 2 * x.T @ x / rows, x


def test_auto_outlier_rule():
    assert [auto_outliers(k) for k in (4096, 14336, 11008, 576, 1536, 64, 300)] == [256, 256, 256, 32, 96, 0, 16]


def test_gptq_keep_last_columns_absorb_the_error():
    w, h, _ = _problem()
    k = w.shape[1]
    grid = IntGrid(4)
    plain = gptq(w, h, grid, k)
    kept = gptq(w, h, grid, k - 16, keep_last=16)
    assert kept.kept.shape == (96, 16) and (kept.q[:, k - 16:] == 0).all()
    assert not torch.equal(kept.kept, w[:, k - 16:])  # the kept columns were updated
    w_hat = torch.cat([kept.q[:, : k - 16].float() * kept.scales[:, :1], kept.kept], 1)
    w_plain = plain.q.float() * plain.scales[:, :1].repeat_interleave(k, 1)[:, :k]
    assert relative_output_error(w, w_hat, h) < relative_output_error(w, w_plain, h)
    with pytest.raises(QConvertError, match="keep_last"):
        gptq(w, h, grid, k, keep_last=k)


def test_split_quantizer_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 40, generator=gen) * 3
    x[1] = 0.0
    x[2] = 2.5
    out_idx = torch.tensor([3, 17, 30])
    base = refq.split_columns(40, out_idx)
    for bits in (4, 8):
        xq, s, z, x_out = refq.quantize_split(x, base, out_idx, bits)
        assert xq.shape == (5, 64) and (xq[:, 37:] == 0).all() and torch.equal(x_out, x[:, out_idx])
        half = 1 << (bits - 1)
        assert int(xq.min()) >= -half and int(xq.max()) <= half - 1
        rec = xq[:, :37].float() * s[:, None] + z[:, None]
        assert ((rec - x[:, base]).abs() <= s[:, None] / 2 * 1.0001 + 1e-6).all()
        assert float(s[1]) == 0 and float(z[1]) == 0 and float(s[2]) == 0 and float(z[2]) == 2.5  # r = 0 rows
        # the per-token extremes are exact levels (lo -> -half, hi -> half - 1)
        assert (xq[0, :37].min() == -half) and (xq[0, :37].max() == half - 1)
        mask = torch.zeros(40, dtype=torch.bool)
        mask[out_idx] = True
        deq = refq.dequantize_split(x, mask, bits)  # the elementwise form: the same numbers
        assert torch.equal(deq[:, out_idx], x[:, out_idx]) and torch.equal(deq[:, base], xq[:, :37].float() * s[:, None] + z[:, None])


def test_split_quantizer_activation_clip():
    """act_clip c: the token's min and max times c (float32), the values beyond them saturate; c = 1
    is the unclipped quantizer bit for bit; the calibration form makes the same numbers."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 90, generator=gen) * 2
    x[1] = 0.0
    out_idx = torch.tensor([4, 60])
    base = refq.split_columns(90, out_idx)
    mask = torch.zeros(90, dtype=torch.bool)
    mask[out_idx] = True
    for bits in (4, 8):
        full = refq.quantize_split(x, base, out_idx, bits)
        assert all(torch.equal(a, b) for a, b in zip(full, refq.quantize_split(x, base, out_idx, bits, 1.0)))
        xq, s, z, _ = refq.quantize_split(x, base, out_idx, bits, 0.5)
        xb = x[:, base]
        lo, hi = xb.amin(1) * 0.5, xb.amax(1) * 0.5
        assert torch.equal(s, (hi - lo) / ((1 << bits) - 1)) and torch.equal(s[1:2], torch.zeros(1))
        half = 1 << (bits - 1)
        beyond = (xb > hi[:, None]) | (xb < lo[:, None])
        assert beyond.sum() > 12 and ((xq[:, :88][beyond] == -half) | (xq[:, :88][beyond] == half - 1)).all()
        rec = xq[:, :88].float() * s[:, None] + z[:, None]
        inside = ~beyond
        assert ((rec - xb).abs()[inside] <= (s[:, None] / 2 * 1.0001 + 1e-6).expand_as(xb)[inside]).all()
        deq = refq.dequantize_split(x, mask, bits, 0.5)
        assert torch.equal(deq[:, base], rec) and torch.equal(deq[:, out_idx], x[:, out_idx])
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="activation clip"):
            refq.quantize_split(x, base, out_idx, 4, bad)


@pytest.mark.parametrize("bits", [4, 8])
def test_gemm_reference_is_the_dequantized_product(bits):
    """y = s t xq·q + z ws R + y_out equals (s xq + z) (ws q)ᵀ + x_out W_outᵀ up to float rounding."""
    gen = torch.Generator().manual_seed(bits)
    m, n, k = 7, 24, 200
    x = torch.randn(m, k, generator=gen)
    out_idx = torch.tensor([0, 50, 199])
    base = refq.split_columns(k, out_idx)
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (n, 256), generator=gen, dtype=torch.int8)
    q[:, 197:] = 0
    ws = torch.rand(n, generator=gen) * 0.1
    w_out = torch.randn(n, 3, generator=gen).half()
    xq, s, z, x_out = refq.quantize_split(x, base, out_idx, bits)
    y, acc = refq.quik_gemm(xq, s, z, q, ws, q.int().sum(1, dtype=torch.int32), refq.outlier_product(x_out, w_out),
                            return_acc=True)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), xq.long() @ q.long().T)
    expect = (xq.double() * s.double()[:, None] + z.double()[:, None]) @ (q.double() * ws.double()[:, None]).T
    expect += x_out.double() @ w_out.double().T
    assert torch.allclose(y.double(), expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("base", ["gptq", "rtn"])
def test_method_outliers_and_layer_consistency(base):
    w, h, x = _problem()
    names = ["m.layers.0.mlp.gate_proj", "m.layers.0.mlp.up_proj"]
    meth = QuikMethod({"bits": 4, "outliers": 16, "base": base})
    qls = meth.quantize_linears(names, [w, w.flip(0)], h, input_amax=x.abs().amax(0))
    idx = qls[0].tensors["outlier_idx"]
    assert torch.equal(idx, qls[1].tensors["outlier_idx"]) and {5, 77, 200} <= set(idx.tolist())
    assert qls[0].activation is qls[1].activation  # one quantizer per shared input
    for ql, ww in zip(qls, [w, w.flip(0)]):
        assert ql.layout == "quik-w4a4" and ql.info["outliers"] == 16
        lin = QuikLinear(ql.layout, ql.tensors, None)
        xs = x[:33]
        y = lin(xs)
        assert torch.allclose(y, ql.activation(xs) @ ql.dequantized.T, rtol=1e-4, atol=1e-3)  # calibration = runtime
        assert float((y - xs @ ww.T).norm() / (xs @ ww.T).norm()) < 0.1
    none = QuikMethod({"bits": 4, "outliers": 0, "base": base}).quantize_linears(names[:1], [w], h, input_amax=x.abs().amax(0))[0]
    y0 = QuikLinear(none.layout, none.tensors, None)(x[:33])
    assert float((y0 - x[:33] @ w.T).norm()) > 3 * float((QuikLinear(qls[0].layout, qls[0].tensors, None)(x[:33]) - x[:33] @ w.T).norm())


def test_outlier_select_rms_takes_the_channels_of_largest_mean_square():
    """``outlier_select = "rms"`` keeps the channels of largest diag H (mean x^2) in fp16, "amax" those
    of largest max |x|: a channel with one huge value goes to the first, channels that are large on
    every token to the second, and the split of these inputs then loses less to int4 with "rms"."""
    w, _, x = _problem(k=128, outliers=())
    x[7, 9] = 400.0  # one token's spike: the largest max |x|, small mean square
    steady = [20, 50, 90]
    x[:, steady] *= 25  # large on every token
    h = 2 * x.T @ x / x.shape[0]
    picks = {}
    for sel in ("amax", "rms"):
        ql = QuikMethod({"outliers": 3, "base": "rtn", "outlier_select": sel}).quantize_linears(
            ["a.q_proj"], [w], h, input_amax=x.abs().amax(0))[0]
        picks[sel] = ql.tensors["outlier_idx"].tolist()
        mask = torch.zeros(128, dtype=torch.bool)
        mask[ql.tensors["outlier_idx"].long()] = True
        picks[sel + "_err"] = float((refq.dequantize_split(x, mask, 4) - x).norm())
    assert picks["rms"] == torch.topk(torch.diagonal(h), 3).indices.sort().values.tolist() == steady
    assert 9 in picks["amax"] and picks["amax"] != steady
    assert picks["rms_err"] < 0.7 * picks["amax_err"]
    with pytest.raises(QConvertError, match="outlier_select='l2' must be 'amax'"):
        QuikMethod({"outlier_select": "l2"})


def test_int8_layers_and_config_errors():
    w, h, x = _problem(k=128, outliers=(5, 77))
    meth = QuikMethod({"bits": 4, "outliers": 8, "int8_layers": ["*.down_proj"]})
    ql = meth.quantize_linears(["a.mlp.down_proj"], [w], h, input_amax=x.abs().amax(0))[0]
    assert ql.layout == "quik-w8a8" and ql.tensors["qweight"].dtype == torch.int8
    assert torch.equal(ql.tensors["wsum"], ql.tensors["qweight"].int().sum(1, dtype=torch.int32))
    for bad, msg in [({"bits": 3}, "bits"), ({"outliers": -1}, "outliers"), ({"outliers": "many"}, "outliers"),
                     ({"group_size": 128}, "allowed parameters")]:
        with pytest.raises(QConvertError, match=msg):
            QuikMethod(bad)
    for clip in (0, 1.5, True, "0.9", 1e-50):  # 1e-50: positive, but 0 in float32
        with pytest.raises(QConvertError, match=r"act_clip=.* must be a number in \(0, 1\]"):
            QuikMethod({"act_clip": clip})
    with pytest.raises(QConvertError, match="--outliers below 128"):
        QuikMethod({"outliers": 128}).quantize_linears(["a"], [w], h, input_amax=x.abs().amax(0))
    with pytest.raises(QConvertError, match="needs calibration"):
        QuikMethod({}).quantize_linear("a", w)


def test_clipped_layer_runs_as_calibrated():
    """With act_clip, the layer the runtime builds from the recorded config (layout.params) quantizes
    its activations as calibration did; a config without act_clip (an OUT written before it) runs
    unclipped, and a bad one is refused with the fix."""
    from qconvert.layouts.quik import QUIK_W4A4

    w, h, x = _problem()
    meth = QuikMethod({"bits": 4, "outliers": 16, "base": "rtn", "act_clip": 0.9})
    ql = meth.quantize_linears(["m.layers.0.mlp.up_proj"], [w], h, input_amax=x.abs().amax(0))[0]
    config = meth.describe()
    assert config["act_clip"] == 0.9 and config["activations"]["clip"] == 0.9

    def shape_of(suffix):
        return tuple(ql.tensors[suffix].shape)
    params = QUIK_W4A4.params(config, shape_of)
    assert params == {"outliers": 16, "act_clip": 0.9}
    lin = QUIK_W4A4.module(ql.tensors, None, **params)
    xs = x[:33]
    assert torch.allclose(lin(xs), ql.activation(xs) @ ql.dequantized.T, rtol=1e-4, atol=1e-3)
    plain = QUIK_W4A4.module(ql.tensors, None, **QUIK_W4A4.params({"bits": 4}, shape_of))
    assert plain.act_clip == 1.0 and not torch.equal(plain(xs), lin(xs))
    assert "act_clip=0.9" in repr(lin) and "act_clip" not in repr(plain)
    with pytest.raises(QConvertError, match="act_clip=2 of layout quik-w4a4 must be a number in"):
        QUIK_W4A4.params({"act_clip": 2}, shape_of)


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def calib_src(tiny_calib_src):
    return tiny_calib_src


def _quantize(src, out, scheme, *extra):
    return quantize_tiny(src, out, scheme, *extra)


def test_pipeline_keeps_the_channels_of_largest_mean_square(calib_src, tmp_path):
    """Through the CLI: with ``outlier_select=rms`` block 0's q_proj keeps in fp16 the channels of
    largest mean square of its calibration inputs (what the pipeline's XᵀX says), which here are
    not those of largest max |x| (the paper's rule, the default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qconvert.calibration_text import calibration_tokens
    from qconvert.formats.safetensors_io import ShardedReader

    model = AutoModelForCausalLM.from_pretrained(calib_src, dtype=torch.float32)
    ids = calibration_tokens("file", AutoTokenizer.from_pretrained(calib_src), 4, 32, seed=0,
                             data_file=calib_src.parent / "calib.txt")
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(ids)
    x = torch.cat(seen).double()
    want = {sel: sorted(torch.topk(score, 8).indices.tolist())
            for sel, score in (("rms", x.pow(2).mean(0)), ("amax", x.abs().amax(0)))}
    assert want["rms"] != want["amax"]
    for sel in ("rms", "amax"):
        out = tmp_path / sel
        res = _quantize(calib_src, out, "quik-w4a4", "--outliers", "8", "--param", f"outlier_select={sel}")
        assert res.exit_code == 0, res.output
        got = ShardedReader(out).get("model.layers.0.self_attn.q_proj.outlier_idx").tolist()
        assert got == want[sel], sel


@pytest.mark.parametrize("scheme,extra,layouts,max_rel", [
    ("quik-w4a4", ["--outliers", "8"], {"quik-w4a4", "quik-w8a8"}, 0.25),
    ("quik-w4a4", [], {"quik-w4a4", "quik-w8a8"}, 0.3),
    ("quik-w8a8", ["--outliers", "8"], {"quik-w8a8"}, 0.05),
])
def test_presets_quantize_load_verify_eval(calib_src, tmp_path, scheme, extra, layouts, max_rel):
    from transformers import AutoModelForCausalLM

    from qconvert import load
    from qconvert.verify import verify

    out = tmp_path / "out"
    res = _quantize(calib_src, out, scheme, *extra)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads((out / "qconvert.json").read_text())
    assert {r["layout"] for r in rep["layers"]} == layouts and len(rep["layers"]) == 14
    want = int(extra[1]) if extra else 0  # auto at K = 64 / 160: 0
    assert all(r["outliers"] == want for r in rep["layers"])
    assert all(r["layout"] == "quik-w8a8" for r in rep["layers"] if r["name"].endswith("down_proj"))
    model = load(out)
    ref = AutoModelForCausalLM.from_pretrained(calib_src, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = model(ids).logits, ref(ids).logits
    assert torch.isfinite(a).all() and float((a - b).norm() / b.norm()) < max_rel
    v = verify(out, data_file=calib_src.parent / "calib.txt")
    assert v.ok, v.failures
    inspect = CliRunner().invoke(cli, ["inspect", str(out)])
    assert inspect.exit_code == 0 and f"{want} fp16 ch" in inspect.output
    ev = CliRunner().invoke(cli, ["eval", str(out), "--data-file", str(calib_src.parent / "calib.txt"), "--seqlen", "16", "--json", "-q"])
    assert ev.exit_code == 0 and json.loads(ev.stdout)["perplexity"] > 1
    clip = 0.9 if scheme == "quik-w4a4" else 1.0  # the presets' act_clip, read back from config.json
    assert {m.act_clip for m in model.modules() if hasattr(m, "act_clip")} == {refq.clip32(clip)}
    card = CliRunner().invoke(cli, ["push", str(out), "me/model", "--dry-run"])
    assert card.exit_code == 0 and "- quik" in card.output and "kept in fp16" in card.output
    assert ("each token's range clipped to 0.9 of its min / max" in card.output) == (clip == 0.9)
    chosen = "mean square" if scheme == "quik-w4a4" else r"max \|x\|"  # the presets' outlier_select (| escaped)
    assert f"by largest calibration {chosen}) kept in fp16" in card.output
    assert f"- w{4 if scheme == 'quik-w4a4' else 8}a{4 if scheme == 'quik-w4a4' else 8}" in card.output


def test_outliers_option_errors(calib_src, tmp_path):
    res = _quantize(calib_src, tmp_path / "a", "is-w4a8", "--outliers", "4")
    assert res.exit_code != 0 and "--outliers applies to quik schemes" in res.output
    res = _quantize(calib_src, tmp_path / "b", "quik-w4a4", "--outliers", "64")
    assert res.exit_code != 0 and "--outliers below 64" in res.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    res = _quantize(calib_src, tmp_path / "c", "quik-w4a4", "--outliers", "-2")
    assert res.exit_code != 0 and "a count >= 0" in res.output


def test_version_1_out_runs_unclipped_and_newer_versions_are_refused(calib_src, tmp_path):
    """An OUT of format version 1 (before act_clip) loads and runs its activations unclipped, as
    it was written; a version this qconvert does not know is refused with the fix."""
    from qconvert import load

    out = tmp_path / "out"
    assert _quantize(calib_src, out, "quik-w4a4", "--outliers", "8").exit_code == 0
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["quantization_config"]["format_version"] == 2 and cfg["quantization_config"]["config"]["act_clip"] == 0.9
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    clipped = load(out)(ids).logits
    del cfg["quantization_config"]["config"]["act_clip"]
    cfg["quantization_config"]["format_version"] = 1
    cfg_path.write_text(json.dumps(cfg))
    v1 = load(out)
    assert {m.act_clip for m in v1.modules() if hasattr(m, "act_clip")} == {1.0}
    assert not torch.equal(v1(ids).logits, clipped)
    cfg["quantization_config"]["format_version"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QConvertError, match="version 3; this qconvert reads qconvert-native versions 1, 2: upgrade"):
        load(out)


def test_verify_catches_a_damaged_quik_layer(calib_src, tmp_path):
    from qconvert.formats.safetensors_io import ShardedReader, write_safetensors
    from qconvert.verify import verify

    out = tmp_path / "out"
    assert _quantize(calib_src, out, "quik-w4a4", "--outliers", "8").exit_code == 0
    reader = ShardedReader(out)
    state = {k: reader.get(k) for k in reader.keys()}
    state["model.layers.0.mlp.up_proj.wsum"] = state["model.layers.0.mlp.up_proj.wsum"] + 1
    state["model.layers.1.self_attn.k_proj.outlier_idx"][0] = 999
    del state["model.layers.1.mlp.down_proj.outlier_weight"]
    write_safetensors(out / "model.safetensors", state)
    text = "\n".join(verify(out, compare_source=False, save=False).failures)
    assert "model.layers.0.mlp.up_proj.wsum is not the row sum" in text
    assert "model.layers.1.self_attn.k_proj.outlier_idx must hold 8 distinct channels" in text
    assert "model.layers.1.mlp.down_proj.outlier_weight is missing" in text


@pytest.mark.slow
def test_smollm2_quik_w4a4_end_to_end(tmp_path, wiki_test):
    """The real model: 32 / 96 fp16 channels (auto), down_proj W8A8, a short calibration."""
    from test_smollm2 import C4

    out = tmp_path / "quik"
    res = CliRunner().invoke(cli, ["quantize", "smollm2-135m", "--scheme", "quik-w4a4", "-o", str(out), "-q",
                                   "--calib", "c4", "--data-file", str(C4), "--nsamples", "8", "--seqlen", "128"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "qconvert.json").read_text())
    outl = {r["name"].rsplit(".", 1)[-1]: r["outliers"] for r in rep["layers"]}
    assert outl["q_proj"] == 32 and outl["down_proj"] == 96
    ev = CliRunner().invoke(cli, ["eval", str(out), "--data-file", str(wiki_test), "--seqlen", "256",
                                  "--max-windows", "2", "--json", "-q"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["perplexity"] < 200


def test_card_command_of_an_out_made_before_act_clip():
    """A quik-w4a4 OUT made before the preset clipped (its report has no act_clip) ran unclipped:
    the card's command says --param act_clip=1.0 so that it makes the same model again; one made
    before outlier_select chose its fp16 channels by max |x|: --param outlier_select=amax."""
    from qconvert.hub import option_flags
    from qconvert.schemes_registry import load_scheme

    params = dict(load_scheme("quik-w4a4").params)
    assert params.pop("act_clip") == 0.9
    assert option_flags({"scheme": {"params": params}}, "quik-w4a4") == ["--param act_clip=1.0"]
    assert option_flags({"scheme": {"params": {**params, "act_clip": 0.9}}}, "quik-w4a4") == []
    # one made before outlier_select and clip_min 0.7 (2026-12-02): its channels were chosen by max |x|
    assert params.pop("outlier_select") == "rms" and params["clip_min"] == 0.7
    before = {**params, "act_clip": 0.9, "clip_min": 0.8}
    assert option_flags({"scheme": {"params": before}}, "quik-w4a4") == ["--param clip_min=0.8",
                                                                          "--param outlier_select=amax"]
