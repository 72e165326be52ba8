"""The shared GPTQ solver and the sequential calibration around it."""

import json

import pytest
import torch
from click.testing import CliRunner

from helpers import TEXT, tiny_config, write_model
from qconvert.cli import cli
from qconvert.errors import QConvertError
from qconvert.solvers.gptq import gptq, relative_output_error
from qconvert.methods.integer_scale import _dequantize, rtn_zero_point
from qconvert.solvers.grids import IntGrid, ZeroPointGrid, clip_factors
from qconvert.solvers.rtn import rtn


def _problem(n=96, k=256, rows=2048, seed=0):
    """Correlated inputs with uneven channel scales, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(rows, k, generator=g) @ mix) * torch.linspace(0.05, 4.0, k)
    w = torch.randn(n, k, generator=g) * 0.05
    return w, 2 * x.T @ x / rows


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest(act_order):
    w, h = _problem()
    res = gptq(w, h, IntGrid(4), 64, act_order=act_order)
    assert res.q.dtype == torch.int8 and res.q.shape == w.shape and res.scales.shape == (96, 4)
    assert int(res.q.min()) >= -8 and int(res.q.max()) <= 7
    w_hat = res.q.float() * res.scales.repeat_interleave(64, dim=1)
    assert torch.allclose(w_hat, res.w_hat, rtol=1e-6, atol=1e-7)
    assert _loss(w, h, res) < 0.8 * relative_output_error(w, rtn(w, 4, 64), h)


def _loss(w, h, res) -> float:
    return relative_output_error(w, res.w_hat, h)


def test_act_order_and_range_search_help():
    w, h = _problem(seed=1)
    plain = _loss(w, h, gptq(w, h, IntGrid(4), 64, act_order=False))
    ordered = _loss(w, h, gptq(w, h, IntGrid(4), 64, act_order=True))
    searched = _loss(w, h, gptq(w, h, IntGrid(4, clip_factors(0.75)), 64, act_order=True))
    assert searched < ordered < plain


def test_stacked_rows_equal_separate_solves():
    """Layers sharing an input are solved as one matrix: the same result as one by one."""
    w, h = _problem(n=64)
    both = gptq(w, h, IntGrid(4), 64)
    top, bottom = gptq(w[:40], h, IntGrid(4), 64), gptq(w[40:], h, IntGrid(4), 64)
    assert torch.equal(both.q, torch.cat([top.q, bottom.q]))
    assert torch.equal(both.scales, torch.cat([top.scales, bottom.scales]))


def test_dead_channels_and_padding():
    w, h = _problem(k=200)  # K not a multiple of the group size: the last group is short
    h[7, :] = 0
    h[:, 7] = 0
    res = gptq(w, h, IntGrid(4), 64)
    assert res.dead == 1 and torch.isfinite(res.scales).all()
    assert (res.q[:, 7] == 0).all()  # an input never seen active gets weight 0
    assert res.scales.shape == (96, 4)


def test_singular_hessian_is_dampened():
    w, _ = _problem(k=128)
    x = torch.randn(16, 128)  # fewer rows than inputs: rank 16
    h = 2 * x.T @ x / 16
    res = gptq(w, h, IntGrid(4), 32)
    assert torch.isfinite(res.scales).all() and _loss(w, h, res) < relative_output_error(w, rtn(w, 4, 32), h)


def test_eight_bit_grid_is_nearly_lossless():
    w, h = _problem()
    assert _loss(w, h, gptq(w, h, IntGrid(8), 64)) < 1e-4


def test_zero_point_grid():
    """Asymmetric groups (w4a16-zp): levels and zero points in [-8, 7], W = s · (q - z) exactly as
    returned, GPTQ below round-to-nearest on the same grid, and below the symmetric grid on
    weights whose groups are lopsided (a symmetric grid leaves one side's levels unused there)."""
    w, h = _problem(k=200)  # a short last group too
    w = w + 0.04 * torch.rand(w.shape[0], 1, generator=torch.Generator().manual_seed(3))  # lopsided rows
    h[7, :] = 0
    h[:, 7] = 0
    grid = ZeroPointGrid(4, clip_factors(0.75))
    res = gptq(w, h, grid, 64)
    assert res.zeros is not None and res.zeros.shape == res.scales.shape == (96, 4)
    for t in (res.q.float(), res.zeros):
        assert int(t.min()) >= -8 and int(t.max()) <= 7 and torch.equal(t, t.round())
    w_hat = (res.q.float() - res.zeros.repeat_interleave(64, dim=1)[:, :200]) * res.scales.repeat_interleave(64, dim=1)[:, :200]
    assert torch.allclose(w_hat, res.w_hat, rtol=1e-6, atol=1e-7)
    assert torch.equal(res.w_hat[:, 7], torch.zeros(96))  # a dead input's weight is 0: q = z there
    q, s, z = rtn_zero_point(w, ZeroPointGrid(4), 64)
    assert (q[:, 200:] == 0).all() and q.shape == (96, 256)
    rtn_zp = relative_output_error(w, _dequantize(q, s, 64, 200, z), h)
    sym = _loss(w, h, gptq(w, h, IntGrid(4, clip_factors(0.75)), 64))
    assert _loss(w, h, res) < 0.8 * rtn_zp
    assert _loss(w, h, res) < 0.9 * sym
    assert rtn_zp < relative_output_error(w, rtn(w, 4, 64), h)
    with pytest.raises(QConvertError, match="keep_last"):  # a kept column's level 0 would decode to -z·s
        gptq(w, h, grid, 64, keep_last=8)


# ---- the calibrated pipeline ---------------------------------------------------------------

@pytest.fixture(scope="module")
def calib_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq")
    src = write_model(d / "src", tiny_config(layers=3))
    (d / "calib.txt").write_text(TEXT)
    return src


def _calibrated(src, out, *extra):
    args = ["quantize", str(src), "-o", str(out), "-q", "--calib", "file", "--data-file", str(src.parent / "calib.txt"),
            "--nsamples", "8", "--seqlen", "64", "-g", "32", *extra]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads((out / "qconvert.json").read_text())


def test_calibrated_quantize_reports_per_layer_errors(calib_src, tmp_path):
    rep = _calibrated(calib_src, tmp_path / "out", "--json", tmp_path / "report.json")
    assert rep["calibration"] == {"source": "file", "data_file": str((calib_src.parent / "calib.txt").resolve()),
                                  "nsamples": 8, "seqlen": 64, "seed": 0, "dtype": "float32",
                                  "asym": 0.25}  # is-w4a8's default --asym-calib
    assert rep["float_path"].startswith(f"cpu {torch.backends.cpu.get_cpu_capability()} kernels")
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")]).output
    assert f"calibrated on file (8 x 64 tokens, seed 0, --asym-calib 0.25); float path: {rep['float_path']}" in shown
    assert len(rep["layers"]) == 3 * 7
    for row in rep["layers"]:
        assert row["base"] == "gptq" and row["calib_rows"] == 8 * 64
        assert 0 < row["gptq_loss"] < row["rtn_loss"], row["name"]
        assert "gptq_seconds" not in row  # OUT stays reproducible
    full = json.loads((tmp_path / "report.json").read_text())
    assert full["timing"]["seconds"] > 0 and all("gptq_seconds" in r for r in full["layers"])
    solved_with = {r["name"].rsplit(".", 1)[1]: r["solved_with"] for r in rep["layers"]}
    assert solved_with == {"q_proj": 3, "k_proj": 3, "v_proj": 3, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 1}


def test_calibrated_output_is_deterministic_and_loads(calib_src, tmp_path):
    from qconvert import load

    _calibrated(calib_src, tmp_path / "a")
    _calibrated(calib_src, tmp_path / "b", "--max-memory", "1KB")  # activations in files instead of RAM
    for name in ("model.safetensors", "qconvert.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not (tmp_path / "b" / "calib").exists()
    ids = torch.randint(0, 300, (1, 24))
    assert torch.isfinite(load(tmp_path / "a")(ids).logits).all()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_block_stages_reproduce_the_block(calib_src, compute_dtype):
    """The staged walk of qconvert.block_walk computes exactly what the decoder block computes
    (in float32), and within bfloat16 rounding when its matmuls run in bfloat16."""
    from qconvert.block_walk import Calibrator
    from qconvert.pipeline import plan_tensors
    from qconvert.skeleton import build_skeleton, target_linears
    from qconvert.source import resolve_source

    src = resolve_source(str(calib_src))
    skel = build_skeleton(src.config)
    targets = target_linears(skel, ["lm_head"])
    names, _ = plan_tensors(src, skel, targets)
    cal = Calibrator(src, skel, names, torch.randint(0, 300, (5, 40)), calib_src.parent, 1 << 30, batch_tokens=80,
                     compute_dtype=compute_dtype)
    cal.embed()
    block = cal.load_block(0)
    x = cal.acts.inputs.clone()
    want = torch.cat([block(x[i : i + 2], **cal.block_kwargs(len(x[i : i + 2]))) for i in range(0, 5, 2)])
    mine = {n: m for n, m in targets.items() if n.startswith("model.layers.0.")}

    def keep(groups):  # "quantize" to the same weights, activations untouched
        return {n: (mine[n].weight.clone(), lambda t: t) for g in groups for n in g.names}

    cal.quantize_block(block, mine, keep)
    got = cal.acts.inputs
    assert got.dtype == torch.float32
    if compute_dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # bf16 keeps 8 significant bits: the block's update (output - input) within a few 2^-8
        delta, want_delta = got - x, want - x
        rel = float((delta - want_delta).norm() / want_delta.norm())
        assert 1e-5 < rel < 2e-2, rel  # bf16 did run (not exact) and stayed close


def test_calibration_errors_are_clear(calib_src, tmp_path):
    res = CliRunner().invoke(cli, ["quantize", str(calib_src), "-o", str(tmp_path / "o"), "--calib", "file"])
    assert res.exit_code != 0 and "--data-file" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["quantize", str(calib_src), "-o", str(tmp_path / "o"), "--data-file",
                                   str(tmp_path / "missing.txt")])
    assert res.exit_code != 0 and "missing.txt" in res.output and "not found" in res.output
    res = CliRunner().invoke(cli, ["quantize", str(calib_src), "-o", str(tmp_path / "o"), "--max-memory", "lots"])
    assert res.exit_code != 0 and "cannot read size 'lots'" in res.output
    res = CliRunner().invoke(cli, ["quantize", str(calib_src), "-o", str(tmp_path / "o"), "--calib-dtype", "float16"])
    assert res.exit_code != 0 and "'float16' is not one of 'float32', 'bfloat16'" in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_default_calibration_is_the_model_itself(calib_src, tmp_path):
    """No data at all: GPTQ calibrates on text the model writes (--calib self)."""
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["quantize", str(calib_src), "-o", str(out), "-q", "--nsamples", "4", "--seqlen", "32",
                                   "-g", "32"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "qconvert.json").read_text())
    assert rep["calibration"]["source"] == "self" and rep["calibration"]["seqlen"] == 32
    assert all(r["gptq_loss"] < r["rtn_loss"] for r in rep["layers"])


def test_base_rtn_override_needs_no_data(calib_src, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["quantize", str(calib_src), "-o", str(out), "-q", "--base", "rtn", "-g", "32"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "qconvert.json").read_text())
    assert rep["calibration"] is None and {r["base"] for r in rep["layers"]} == {"rtn"}
    assert "float_path" not in rep  # no float forward decided anything: the same bytes on every CPU


def test_weight_only_preset_runs_in_float(calib_src, tmp_path):
    from qconvert import load

    out = tmp_path / "w4a16"
    res = CliRunner().invoke(cli, ["quantize", str(calib_src), "--scheme", "w4a16-gptq", "-o", str(out), "-q", "--calib",
                                   "file", "--data-file", str(calib_src.parent / "calib.txt"), "--nsamples", "4",
                                   "--seqlen", "32", "-g", "32"])
    assert res.exit_code == 0, res.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["modules"].values()) == {"w4a16"}
    model = load(out)
    ids = torch.randint(0, 300, (1, 16))
    ref = load(out)(ids).logits
    assert torch.equal(model(ids).logits, ref) and torch.isfinite(ref).all()


def _refit_probe():
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import gptq_refit

    return gptq_refit


def test_refit_probe_solves_the_scales_and_never_raises_a_rows_loss():
    """benchmarks/gptq_refit.py: with the levels fixed, the refit finds the scales that reproduce W
    exactly where such scales exist, and never raises a row's loss on a real GPTQ result."""
    probe = _refit_probe()
    g = torch.Generator().manual_seed(3)
    levels = torch.randint(-8, 8, (6, 256), generator=g).float()
    true = (torch.rand(6, 2, generator=g) * 0.01 + 0.001).half().float()
    w = levels * true.repeat_interleave(128, dim=1)
    h = (lambda x: x.T @ x / 512)(torch.randn(512, 256, generator=g))
    refit = probe.refit_scales(w, h, levels, true * 1.3, 128)
    assert torch.allclose(refit, true, rtol=2e-3)
    w, h = _problem()
    for grid in (IntGrid(4, clip_factors(0.7)), ZeroPointGrid(4, clip_factors(0.7))):
        res = gptq(w, h, grid, 128)
        w_hat = probe.refit_w_hat(w, h, res)

        def row_loss(wh):
            e = w - wh
            return ((e @ h) * e).sum(1)

        assert (row_loss(w_hat) <= row_loss(res.w_hat) * (1 + 1e-6)).all()
        assert relative_output_error(w, w_hat, h) < relative_output_error(w, res.w_hat, h)


def test_accuracy_runs_collects_a_scored_out(calib_src, tmp_path):
    """benchmarks/accuracy_runs.py on a real calibrated OUT: the row names the changed parameter,
    the calibration and the report's float path; an OUT without the protocol's score is refused."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy_runs.py"
    out = tmp_path / "clip"
    rep = _calibrated(calib_src, out, "--param", "clip_min=0.6", "--seed", "2")
    results = tmp_path / "runs.json"
    cmd = [sys.executable, str(script), str(out), "--results", str(results)]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode != 0 and "qconvert eval" in refused.stderr and not results.exists()
    # the score qconvert eval keeps in OUT/eval.json (written here: the tiny model has no 40 x 512 windows)
    (out / "eval.json").write_text(json.dumps([{"dataset": "wikitext2", "seqlen": 512, "windows": 40,
                                                "perplexity": 31.5}]))
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(results.read_text())
    assert row["params_changed"] == {"clip_min": 0.6, "group_size": 32} and row["calibration"]["seed"] == 2
    assert row["float_path"] == rep["float_path"] and not row["float_path_given"]
    assert row["ratio_to_fp"] == round(31.5 / 28.972, 4) and "clip" in done.stdout
    subprocess.run(cmd, check=True, capture_output=True)  # the same OUT again replaces its row
    assert len(json.loads(results.read_text())) == 1
