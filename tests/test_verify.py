"""`qconvert verify`: integrity and numerics of an OUT, on tiny models."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers import run_cli, tiny_config, write_model
from qconvert import quantize
from qconvert.cli import cli
from qconvert.formats.native import write_manifest
from qconvert.formats.safetensors_io import SafetensorsFile, write_safetensors
from qconvert.schemes_registry import load_scheme, with_params
from qconvert.verify import verify


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    src = write_model(d / "src", tiny_config(layers=2))
    out = quantize(str(src), "is-w4a8-rtn", d / "out", group_size=32, progress=False)
    return src, out


@pytest.fixture
def copy(made, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(made[1], dst)
    return dst


def test_intact_output_passes_and_is_saved(made, copy):
    src, _ = made
    res = CliRunner().invoke(cli, ["verify", str(copy), "--against", str(src), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["ok"] and rep["checked_files"] >= 5 and rep["checked_tensors"] > 14
    assert len(rep["layers"]) == 14 and rep["min_snr_db"] > 10 and rep["top1_agreement"] > 0.5
    assert json.loads((copy / "verify.json").read_text())["ok"]
    # and verify.json itself does not make the next verify fail
    assert CliRunner().invoke(cli, ["verify", str(copy), "--no-compare"]).exit_code == 0


def test_the_recorded_source_is_the_default(made, copy):
    rep = verify(copy, n_tokens=16)
    assert rep.ok and rep.against == str(made[0])


def test_a_different_model_fails_the_comparison(tmp_path, copy):
    other = write_model(tmp_path / "other", tiny_config(layers=2), state=None)
    torch.manual_seed(1)
    f = SafetensorsFile(other / "model.safetensors")
    state = {n: torch.randn_like(f.get(n)) for n in f.keys()}
    write_safetensors(other / "model.safetensors", state)
    res = CliRunner().invoke(cli, ["verify", str(copy), "--against", str(other)])
    assert res.exit_code == 1 and "dB SNR" in res.output


@pytest.mark.parametrize("damage, message", [
    (lambda d: _flip(d / "model.safetensors", 5000), "sha256 differs"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is listed in the manifest but missing"),
    (lambda d: (d / "notes.txt").write_text("x"), "notes.txt is not in the manifest"),
    (lambda d: (d / "manifest.json").write_text("{"), "manifest.json is malformed"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
])
def test_file_damage_is_caught(copy, damage, message):
    damage(copy)
    res = CliRunner().invoke(cli, ["verify", str(copy), "--no-compare"])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


def _flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def _rewrite(out, edit):
    """Change tensors and re-seal the manifest: damage only the deeper checks can see."""
    f = SafetensorsFile(out / "model.safetensors")
    state = {n: f.get(n).clone() for n in f.keys()}
    edit(state)
    write_safetensors(out / "model.safetensors", state)
    (out / "manifest.json").unlink()
    write_manifest(out)


L0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s[f"{L0}.iscale"].zero_(), "iscale holds values below 1"),
    (lambda s: s.__setitem__(f"{L0}.iscale", s[f"{L0}.iscale"][:, :1].contiguous()), "the format declares"),
    (lambda s: s.__setitem__(f"{L0}.iscale", s[f"{L0}.iscale"] * 64), "can overflow int32"),
    (lambda s: s.pop(f"{L0}.cscale"), f"tensor {L0}.cscale is missing"),
    (lambda s: s.__setitem__("model.extra.weight", torch.zeros(2)), "does not belong to the model"),
    (lambda s: s[f"{L0}.alpha_log2"].fill_(40), "outside 0..30"),
])
def test_tensor_damage_is_caught(copy, edit, message):
    _rewrite(copy, edit)
    rep = verify(copy, compare_source=False, save=False)
    assert not rep.ok and any(message in f for f in rep.failures), rep.failures


@pytest.mark.parametrize("edit, message", [
    (lambda s: s[f"{L0}.zeros"].fill_(8), "zeros holds values outside [-8, 7]"),
    (lambda s: s.pop(f"{L0}.zeros"), f"tensor {L0}.zeros is missing"),
])
def test_zero_point_damage_is_caught(made, tmp_path, edit, message):
    scheme = with_params(load_scheme("w4a16-gptq"), {"symmetric": False})
    out = quantize(str(made[0]), scheme, tmp_path / "zp", group_size=32, base="rtn", progress=False)
    assert verify(out, compare_source=False, save=False).ok
    _rewrite(out, edit)
    rep = verify(out, compare_source=False, save=False)
    assert not rep.ok and any(message in f for f in rep.failures), rep.failures


def test_config_that_disagrees_is_caught(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["intermediate_size"] += 32
    (copy / "config.json").write_text(json.dumps(cfg))
    (copy / "manifest.json").unlink()
    write_manifest(copy)
    rep = verify(copy, compare_source=False, save=False)
    assert not rep.ok and any("the config implies" in f for f in rep.failures)


# ---- the streamed comparison (a source that does not fit in memory) -----------------------------

def _moe_source(d):
    from helpers import save_pretrained_model, tiny_moe_config

    return save_pretrained_model(d / "src", tiny_moe_config("mixtral", layers=2, init_std=0.1), tokenizer=True)


def _rtn(src, out, *extra):
    return run_cli("quantize", src, "--scheme", "is-w4a8-rtn", "-o", out, "-q", *extra)


# (source, how OUT is made): a plain Llama, a tied head, a quantized head, Qwen2's q/k/v biases, a rotated model with
# the online transform before down_proj (its source is the rotated one, untied), a mixture of
# experts, and I-LLM's whole-model integer runtime
STREAM_CASES = {
    "llama": (lambda d: write_model(d / "src", tiny_config(layers=2)), _rtn),
    "tied": (lambda d: write_model(d / "src", tiny_config(layers=2, tie=True)), _rtn),
    "quantized-head": (lambda d: write_model(d / "src", tiny_config(layers=2)),
                       lambda src, out: _rtn(src, out, "--quantize-lm-head")),
    "qwen2": (lambda d: write_model(d / "src", tiny_config("qwen2", layers=2)), _rtn),
    "rotated-online": (lambda d: _calib_source(d),
                       lambda src, out: _calibrated(src, out, "quik-w4a4", "--outliers", "0", "--rotate",
                                                    "hadamard+online", "--param", "act_clip=1")),
    "mixtral": (_moe_source, _rtn),
    "illm": (lambda d: _calib_source(d), lambda src, out: _calibrated(src, out, "illm-w8a8")),
}


def _calib_source(d):
    from helpers import TEXT

    src = write_model(d / "src", tiny_config(layers=2))
    (d / "calib.txt").write_text(TEXT)
    return src


def _calibrated(src, out, scheme, *extra):
    from helpers import quantize_tiny

    res = quantize_tiny(src, out, scheme, *extra)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_streamed_comparison_equals_the_whole_model(case, tmp_path, monkeypatch):
    from helpers import TEXT

    from qconvert.block_walk import Calibrator
    from qconvert.source import Source

    make_src, make_out = STREAM_CASES[case]
    src = make_src(tmp_path)
    make_out(src, tmp_path / "out")
    sample = tmp_path / "sample.txt"
    sample.write_text(TEXT * 3)
    whole = verify(tmp_path / "out", data_file=sample, n_tokens=40, save=False, stream=False)
    assert whole.ok and not whole.streamed and whole.sample == str(sample), whole.failures

    load_block = Calibrator.load_block

    def one_block_at_a_time(self, index):  # every other decoder block still on the meta device
        for j, other in enumerate(self.layers):
            held = [n for n, p in other.named_parameters() if not p.is_meta]
            assert j == index or not held, f"block {j} holds {held[:2]} while block {index} loads"
        return load_block(self, index)

    monkeypatch.setattr(Calibrator, "load_block", one_block_at_a_time)
    monkeypatch.setattr(Source, "load_model", lambda *a, **k: pytest.fail("the streamed path loaded the whole source"))
    streamed = verify(tmp_path / "out", data_file=sample, n_tokens=40, save=False, stream=True)
    assert streamed.ok and streamed.streamed, streamed.failures
    assert streamed.sample_tokens == whole.sample_tokens == 40
    assert [r["name"] for r in streamed.layers] == [r["name"] for r in whole.layers] and whole.layers
    assert (whole.layers[-1]["name"] == "lm_head") == (case == "quantized-head")
    for a, b in zip(streamed.layers, whole.layers):
        assert a["snr_db"] == pytest.approx(b["snr_db"], abs=0.02), a["name"]
    assert streamed.kl == pytest.approx(whole.kl, rel=1e-4, abs=1e-7)
    assert streamed.top1_agreement == whole.top1_agreement


def test_a_streamed_comparison_still_fails_a_different_model(made, copy, tmp_path):
    other = write_model(tmp_path / "other", tiny_config(layers=2), state=None)
    torch.manual_seed(1)
    f = SafetensorsFile(other / "model.safetensors")
    write_safetensors(other / "model.safetensors", {n: torch.randn_like(f.get(n)) for n in f.keys()})
    res = CliRunner().invoke(cli, ["verify", str(copy), "--against", str(other), "--stream"])
    assert res.exit_code == 1 and "dB SNR" in res.output and "streamed block by block" in res.output


def test_streaming_is_chosen_by_the_free_memory(made, copy, monkeypatch):
    from qconvert import placement
    from qconvert.layouts import derived

    monkeypatch.setattr(derived, "CACHE", derived.DerivedCache(1 << 40))  # its budget is not this test's RAM
    from qconvert.source import resolve_source
    from qconvert.verify import SAMPLE_TEXT, source_float_bytes

    src = resolve_source(str(made[0]))
    f = SafetensorsFile(made[0] / "model.safetensors")
    need = source_float_bytes(src)
    assert need == 4 * sum(f.get(n).numel() for n in f.keys())
    monkeypatch.setattr(placement, "available_ram", lambda: 2 * need + 2)  # it fits: the source model writes the text
    rep = verify(copy, n_tokens=16, save=False)
    assert rep.ok and not rep.streamed and rep.sample == "text the source wrote"
    monkeypatch.setattr(placement, "available_ram", lambda: 2 * need - 2)  # it does not: streamed, on the built-in passage
    rep = verify(copy, save=False)
    tok = src.load_tokenizer()
    assert rep.ok and rep.streamed and "built-in passage" in rep.sample
    assert rep.sample_tokens == min(128, len(tok(SAMPLE_TEXT).input_ids))
    res = CliRunner().invoke(cli, ["verify", str(copy), "--no-stream", "--tokens", "16"])  # the user decides
    assert res.exit_code == 0 and "streamed" not in res.output and "text the source wrote" in res.output
    # the slow stages say what they do as they start (stderr), so minutes of model runs are not silent
    for line in ("verify: comparing with", "verify: the source writes a 16-token sample", "verify: running OUT on it"):
        assert line in res.output, (line, res.output)


def test_a_streamed_source_without_a_tokenizer_is_a_clear_error(tmp_path):
    src = write_model(tmp_path / "src", tiny_config(layers=1), tokenizer=False)
    out = quantize(str(src), "is-w4a8-rtn", tmp_path / "out", group_size=32, progress=False)
    res = CliRunner().invoke(cli, ["verify", str(out), "--stream"])
    assert res.exit_code != 0 and "has no tokenizer, which a streamed comparison needs" in res.output
    errors = [ln for ln in res.output.strip().splitlines() if not ln.startswith("verify: ")]   # stage lines aside
    assert len(errors) == 1 and not (out / "verify.json").exists()
    assert verify(out, n_tokens=8, save=False).ok  # held in memory, the source writes its own sample


def test_a_narrower_run_keeps_the_comparison_and_a_target_failure_keeps_the_report(made, copy):
    """A files-only run replaced verify.json and the card lost its SNR / KL / top-1; a failing --target
    check (a serving question: the OUT did not change) deleted the passing comparison.  Now the first keeps
    the earlier comparison (its files passed their sha256: the same tensors), the second keeps the file,
    and only a failure of OUT's own checks removes it."""
    src, _ = made
    run_cli("verify", copy, "--against", src)
    full = json.loads((copy / "verify.json").read_text())
    assert full["against"] == str(src) and full["kl"] is not None
    res = run_cli("verify", copy, "--no-compare")
    assert f"keeps the earlier run's comparison with {src}" in res.output
    kept = json.loads((copy / "verify.json").read_text())
    assert kept["ok"] and kept["kept_comparison"] == str(src)
    assert all(kept[k] == full[k] for k in ("against", "kl", "top1_agreement", "min_snr_db", "layers", "sample_tokens"))
    # down_proj's K = 160 is 80 per rank at tensor parallel 2, not a multiple of g = 32: the target fails
    res = run_cli("verify", copy, "--no-compare", "--target", "vllm:sm90", "--tensor-parallel", 2, ok=False)
    assert res.exit_code == 1 and "OUT's own checks passed; only the --target check failed" in res.output
    assert json.loads((copy / "verify.json").read_text()) == kept
    # a damaged OUT: its own check fails, and the earlier pass goes
    (copy / "tokenizer.json").write_text("{}")
    res = run_cli("verify", copy, "--no-compare", ok=False)
    assert res.exit_code == 1 and "no longer holds" in res.output and not (copy / "verify.json").exists()


def test_a_recorded_source_that_is_gone_is_named_after_the_file_checks(tmp_path, copy):
    """OUT's recorded source moved away: verify blamed a "SOURCE" the user never typed and ran no file
    check.  Now the file checks run and pass, the failure names the recorded source and the options that
    get past it, and an earlier passing report stays (OUT did not change)."""
    report = json.loads((copy / "qconvert.json").read_text())
    gone = tmp_path / "moved-away"
    report["source"] = str(gone)
    (copy / "qconvert.json").write_text(json.dumps(report))
    write_manifest(copy)
    (copy / "verify.json").write_text(json.dumps({"ok": True, "against": "earlier"}))
    res = CliRunner().invoke(cli, ["verify", str(copy)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert " files and " in res.output and "tensors checked" in res.output
    assert f"the source OUT was made from ({gone}, recorded in qconvert.json) cannot be read here" in res.output
    assert "--against SOURCE" in res.output and "--no-compare" in res.output
    assert json.loads((copy / "verify.json").read_text())["against"] == "earlier"
    assert "kept " in res.output and "its recorded source cannot be read here" in res.output
    assert CliRunner().invoke(cli, ["verify", str(copy), "--no-compare"]).exit_code == 0
