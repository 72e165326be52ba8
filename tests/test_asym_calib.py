"""Asymmetric calibration (``--asym-calib ALPHA``, GPTAQ): GPTQ aims at the float model's output.

The solver part is checked against a least-squares solve; the walk part checks that the float
copy of each block really runs the float model and that each linear's float and quantized inputs
are paired row for row (against inputs caught independently from the transformers block)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import TEXT, save_pretrained_model, tiny_moe_config
from qconvert.cli import cli
from qconvert.solvers.gptq import asymmetric_target, gptq
from qconvert.solvers.grids import IntGrid


def _pair(n=48, k=96, rows=1024, noise=0.3, seed=0):
    """A weight, the float inputs X_f and the quantized model's inputs X = X_f + noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    xf = (torch.randn(rows, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)
    x = xf + noise * torch.randn(rows, k, generator=g) * xf.std(dim=0)
    w = torch.randn(n, k, generator=g) * 0.05
    return w, xf, x


def _stats(xf, x):
    rows = x.shape[0]
    return 2 * x.T @ x / rows, 2 * (xf - x).T @ x / rows


def test_target_is_the_least_squares_fit_of_the_float_output():
    w, xf, x = _pair()
    h, shift = _stats(xf, x)
    got = asymmetric_target(w, h, shift, 1.0, damp=0.0)
    want = torch.linalg.lstsq(x.double(), (xf @ w.T).double()).solution.T.float()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert float((got - w).norm() / w.norm()) > 0.05  # the problem does move the weight
    assert torch.equal(asymmetric_target(w, h, shift, 0.0), w)  # alpha 0: GPTQ's own target
    half = asymmetric_target(w, h, shift, 0.5, damp=0.0)
    torch.testing.assert_close(half, w + 0.5 * (got - w), rtol=1e-4, atol=1e-6)


def test_gptq_on_the_target_matches_the_float_output_better():
    w, xf, x = _pair(seed=1)
    h, shift = _stats(xf, x)
    grid = IntGrid(4)

    def float_output_error(w_hat):
        return float((xf @ w.T - x @ w_hat.T).square().sum() / (xf @ w.T).square().sum())

    plain = float_output_error(gptq(w, h, grid, 32).w_hat)
    asym = float_output_error(gptq(asymmetric_target(w, h, shift, 1.0), h, grid, 32).w_hat)
    assert asym < 0.8 * plain, (asym, plain)


def _calibrator(src, tmp_path, asym):
    from qconvert.block_walk import Calibrator
    from qconvert.pipeline import plan_tensors
    from qconvert.skeleton import build_skeleton, target_linears
    from qconvert.source import resolve_source

    source = resolve_source(str(src))
    skel = build_skeleton(source.config)
    targets = target_linears(skel, ["lm_head"])
    names, _ = plan_tensors(source, skel, targets)
    tokens = torch.randint(0, 300, (5, 40), generator=torch.Generator().manual_seed(0))
    cal = Calibrator(source, skel, names, tokens, tmp_path, 1 << 30, batch_tokens=80, asym=asym)
    cal.embed()
    return cal, targets


def _run_block(cal, block, x):
    return torch.cat([block(x[i : i + 2], **cal.block_kwargs(len(x[i : i + 2]))) for i in range(0, len(x), 2)])


def test_unchanged_weights_give_no_shift(tiny_calib_src, tmp_path):
    """'Quantizing' to the same weights: the float copy computes what the block computes, every
    shift is exactly zero and both streams stay equal through two blocks."""
    cal, targets = _calibrator(tiny_calib_src, tmp_path, 1.0)
    for index in range(2):
        block = cal.load_block(index)
        mine = {n: m for n, m in targets.items() if n.startswith(f"model.layers.{index}.")}
        shifts = []

        def keep(groups):
            shifts.extend(g.shift for g in groups)
            return {n: (mine[n].weight.clone(), lambda t: t) for g in groups for n in g.names}

        cal.quantize_block(block, mine, keep)
        cal.release_block(block)
        assert len(shifts) == 4 and all(s is not None and not s.any() for s in shifts)
        assert torch.equal(cal.acts.inputs, cal.float_acts.inputs)


def test_float_and_quantized_inputs_are_paired(tiny_calib_src, tmp_path):
    """Block 0 with its q/k/v perturbed: o_proj's shift is 2 (X_f - X)ᵀ X / rows for the attention
    outputs caught from the transformers block with the float and with the perturbed weights, and
    the float buffer holds the float block's output."""
    cal, targets = _calibrator(tiny_calib_src, tmp_path, 1.0)
    block = cal.load_block(0)
    original = copy.deepcopy(block)
    x = cal.acts.inputs.clone()
    mine = {n: m for n, m in targets.items() if n.startswith("model.layers.0.")}
    g = torch.Generator().manual_seed(3)
    installed, groups_seen = {}, {}

    def perturb(groups):
        out = {}
        for grp in groups:
            groups_seen[grp.names[0].rsplit(".", 1)[-1]] = grp
            for n in grp.names:
                w = mine[n].weight.clone()
                installed[n] = w + 0.3 * w.std() * torch.randn(w.shape, generator=g)
                out[n] = (installed[n], lambda t: t)
        return out

    cal.quantize_block(block, mine, perturb)

    def o_proj_input(blk):
        caught = []
        h = blk.self_attn.o_proj.register_forward_pre_hook(lambda m, a: caught.append(a[0].reshape(-1, a[0].shape[-1])))
        _run_block(cal, blk, x)
        h.remove()
        return torch.cat(caught)

    xf = o_proj_input(original)
    quant = copy.deepcopy(original)
    for n, w in installed.items():
        if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"):
            quant.get_submodule(n.removeprefix("model.layers.0.")).weight.copy_(w)
    xq = o_proj_input(quant)
    assert not torch.equal(xf, xq)
    want = 2 * (xf - xq).T @ xq / xq.shape[0]
    got = groups_seen["o_proj"].shift
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert not groups_seen["q_proj"].shift.any()  # block 0's first input is the same embedding
    torch.testing.assert_close(cal.float_acts.inputs, _run_block(cal, original, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cal.acts.inputs, cal.float_acts.inputs, atol=1e-3)


def _quantize(src, out, *extra):
    return CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "-q", "--data-file",
                                    str(src.parent / "calib.txt"), "--nsamples", "8", "--seqlen", "48", *extra])


def test_cli_records_it_and_resume_must_match(tiny_calib_src, tmp_path):
    res = _quantize(tiny_calib_src, tmp_path / "a", "--asym-calib", "0.25")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a" / "qconvert.json").read_text())
    assert report["calibration"]["asym"] == 0.25
    shifts = {r["name"]: r["asym_shift"] for r in report["layers"]}
    assert all(shifts[f"model.layers.0.self_attn.{p}_proj"] == 0.0 for p in "qkv")
    assert all(v > 0 for n, v in shifts.items() if ".layers.1." in n or "o_proj" in n or "mlp" in n)
    from qconvert.hub import model_card

    assert "asymmetric calibration, GPTAQ, alpha 0.25" in model_card(tmp_path / "a")
    plain = _quantize(tiny_calib_src, tmp_path / "b", "--asym-calib", "0")
    assert plain.exit_code == 0, plain.output
    assert "asym" not in json.loads((tmp_path / "b" / "qconvert.json").read_text())["calibration"]
    assert "asymmetric" not in model_card(tmp_path / "b")
    res = _quantize(tiny_calib_src, tmp_path / "c", "--asym-calib", "1.5")
    assert res.exit_code == 2 and "--asym-calib" in res.output and "0.0<=x<=1.0" in res.output
    assert not (tmp_path / "c").exists()


def test_preset_default_and_its_moe_fallback(tiny_calib_src, tmp_path):
    """The presets measured to gain (docs/accuracy.md) calibrate asymmetrically unless told
    otherwise; a mixture of experts, which cannot, falls back to symmetric GPTQ and says so,
    while an explicit --asym-calib on it still stops with one line."""
    from qconvert.schemes_registry import list_presets, load_scheme

    assert {s.name: s.asym_calib for s in list_presets() if s.asym_calib} == {
        "is-w4a8": 0.25, "w4a8-fs": 0.25, "w4a16-gptq-zp": 0.25, "quik-w4a4": 0.25, "illm-w4a4": 0.25,
        "illm-w4a8": 0.25}
    res = _quantize(tiny_calib_src, tmp_path / "default")  # is-w4a8, the default scheme
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "default" / "qconvert.json").read_text())["calibration"]["asym"] == 0.25
    for name, extra in (("gptq", ["--scheme", "w4a16-gptq"]),  # a preset without the default
                        ("rtn", ["--scheme", "quik-w4a4", "--base", "rtn"])):  # calibrated, but no GPTQ to aim
        res = _quantize(tiny_calib_src, tmp_path / name, *extra)
        assert res.exit_code == 0, res.output
        assert "asym" not in json.loads((tmp_path / name / "qconvert.json").read_text())["calibration"]

    src = save_pretrained_model(tmp_path / "moe", tiny_moe_config("mixtral", layers=1, init_std=0.1), tokenizer=True)
    (tmp_path / "calib.txt").write_text(TEXT)
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "moe-out"), "-q", "--data-file",
                                   str(tmp_path / "calib.txt"), "--nsamples", "8", "--seqlen", "48", "-g", "32"])
    assert res.exit_code == 0, res.output
    assert "symmetric calibration: is-w4a8's default --asym-calib 0.25 cannot pair a mixture-of-experts" in res.output
    assert "asym" not in json.loads((tmp_path / "moe-out" / "qconvert.json").read_text())["calibration"]
    res = _quantize(src, tmp_path / "out", "--asym-calib", "0.25", "-g", "32")
    assert res.exit_code == 1 and "mixture-of-experts" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    bad = tmp_path / "bad.toml"
    bad.write_text(Path(load_scheme("is-w4a8").path).read_text().replace("asym_calib = 0.25", "asym_calib = 2"))
    res = _quantize(tiny_calib_src, tmp_path / "bad", "--scheme", str(bad))
    assert res.exit_code == 1 and "'asym_calib' must be a number from 0 (off) to 1" in res.output
    assert not (tmp_path / "bad").exists()

