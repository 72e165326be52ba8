"""Atomic, resumable output: SIGKILL at several points, Ctrl-C and a full disk, then --resume."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import tiny_config, write_model
from qconvert.cli import cli

SHARD = "40KB"  # small shards, so that shards close in the middle of the run


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("resume") / "src", tiny_config(layers=4))


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "-q"])
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("model-*.safetensors"))) > 3
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _quantize_cmd(src, out, *extra):
    return [sys.executable, "-m", "qconvert.cli", "quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "-q", *extra]


@pytest.mark.parametrize("fault", ["tensor:1", "tensor:20", "tensor:75", "tensor:150", "closed:1", "finished:1"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, src, reference, fault):
    out = tmp_path / "out"
    killed = subprocess.run(_quantize_cmd(src, out), env={**os.environ, "QCONVERT_FAULT": fault}, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not out.exists(), "a killed run must never leave an OUT that looks complete"
    assert (tmp_path / "out.partial").is_dir()

    again = subprocess.run(_quantize_cmd(src, out), capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr

    done = subprocess.run(_quantize_cmd(src, out, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "out.partial").exists()
    assert _files(out) == _files(reference)


def test_ctrl_c_keeps_the_partial_for_resume(tmp_path, src, reference, monkeypatch):
    from qconvert.methods.integer_scale import IntegerScaleMethod

    real = IntegerScaleMethod.quantize_linear
    calls = {"n": 0}

    def interrupted(self, name, w):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(self, name, w)

    monkeypatch.setattr(IntegerScaleMethod, "quantize_linear", interrupted)
    out = tmp_path / "out"
    args = ["quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "-q"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 130 and "--resume" in res.output
    assert not out.exists() and (tmp_path / "out.partial").is_dir()
    monkeypatch.setattr(IntegerScaleMethod, "quantize_linear", real)
    res = CliRunner().invoke(cli, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert _files(out) == _files(reference)


def test_disk_full_is_a_clear_error_and_resumable(tmp_path, src, reference, monkeypatch):
    from qconvert.formats import safetensors_io

    real = safetensors_io._ShardBuilder.add
    calls = {"n": 0}

    def full(self, name, t):
        calls["n"] += 1
        if calls["n"] == 60:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, t)

    monkeypatch.setattr(safetensors_io._ShardBuilder, "add", full)
    out = tmp_path / "out"
    args = ["quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "-q"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "No space left on device" in res.output and "--resume" in res.output
    assert "Traceback" not in res.output and not out.exists()
    monkeypatch.setattr(safetensors_io._ShardBuilder, "add", real)
    assert CliRunner().invoke(cli, args + ["--resume"]).exit_code == 0
    assert _files(out) == _files(reference)


def test_resume_with_other_settings_is_refused(tmp_path, src):
    out = tmp_path / "out"
    killed = subprocess.run(_quantize_cmd(src, out), env={**os.environ, "QCONVERT_FAULT": "tensor:60"}, capture_output=True)
    assert killed.returncode == -9
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "-g", "32", "--resume"])
    assert res.exit_code == 1 and "other settings" in res.output and "group_size" in res.output


def test_unwritable_output_is_a_clear_error(tmp_path, src):
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", "/proc/qconvert-out", "-q"])
    assert res.exit_code == 1 and "writable" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "no" / "such" / "out"), "-q"])
    assert res.exit_code == 1 and "does not exist" in res.output
