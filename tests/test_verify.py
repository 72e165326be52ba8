"""`qconvert verify`: integrity and numerics of an OUT, on tiny models."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers import tiny_config, write_model
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
