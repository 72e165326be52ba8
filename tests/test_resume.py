"""Atomic, resumable output: SIGKILL at several points, Ctrl-C and a full disk, then --resume."""

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import TEXT, tiny_config, write_model
from qconvert.cli import cli

SHARD = "40KB"  # small shards, so that shards close in the middle of the run


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = write_model(tmp_path_factory.mktemp("resume") / "src", tiny_config(layers=4))
    (d.parent / "calib.txt").write_text(TEXT)
    return d


def _calib(src):
    """GPTQ (is-w4a8) with a small calibration: the activations must survive the kill too."""
    return ["--calib", "file", "--data-file", str(src.parent / "calib.txt"), "--nsamples", "6", "--seqlen", "48"]


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "-q", *_calib(src)])
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("model-*.safetensors"))) > 3
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _quantize_cmd(src, out, *extra):
    return [sys.executable, "-m", "qconvert.cli", "quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "-q",
            *_calib(src), *extra]


@pytest.mark.parametrize("fault,memory", [
    ("tensor:1", None), ("tensor:20", None), ("tensor:75", None), ("tensor:150", None), ("closed:1", None),
    ("finished:1", None), ("tensor:20", "1KB"), ("tensor:75", "1KB"),  # 1KB: activations kept in files
])
def test_sigkill_then_resume_is_bit_identical(tmp_path, src, reference, fault, memory):
    out = tmp_path / "out"
    mem = ["--max-memory", memory] if memory else []
    killed = subprocess.run(_quantize_cmd(src, out, *mem), env={**os.environ, "QCONVERT_FAULT": fault}, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not out.exists(), "a killed run must never leave an OUT that looks complete"
    assert (tmp_path / "out.partial").is_dir()

    again = subprocess.run(_quantize_cmd(src, out), capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr

    done = subprocess.run(_quantize_cmd(src, out, "--resume", *mem), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "out.partial").exists()
    assert _files(out) == _files(reference)


def test_ctrl_c_keeps_the_partial_for_resume(tmp_path, src, reference, monkeypatch):
    from qconvert.methods.integer_scale import IntegerScaleMethod

    real = IntegerScaleMethod.quantize_linears
    calls = {"n": 0}

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # in block 1 (four solves a block)
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(IntegerScaleMethod, "quantize_linears", interrupted)
    out = tmp_path / "out"
    args = ["quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "-q", *_calib(src)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 130 and "--resume" in res.output
    assert not out.exists() and (tmp_path / "out.partial").is_dir()
    monkeypatch.setattr(IntegerScaleMethod, "quantize_linears", real)
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
    args = ["quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "-q", *_calib(src)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "No space left on device" in res.output and "--resume" in res.output
    assert "Traceback" not in res.output and not out.exists()
    monkeypatch.setattr(safetensors_io._ShardBuilder, "add", real)
    res = CliRunner().invoke(cli, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert re.search(r"resuming out\.partial: [1-9]\d* of \d+ stages done \(the embeddings and head, then \d+ blocks\)",
                     res.output), res.output
    assert _files(out) == _files(reference)
    again = CliRunner().invoke(cli, [*args[:3], str(tmp_path / "fresh"), *args[4:], "--resume"])
    assert again.exit_code == 0 and "nothing to resume in fresh.partial" in again.output, again.output


def test_resume_with_other_settings_is_refused(tmp_path, src):
    out = tmp_path / "out"
    killed = subprocess.run(_quantize_cmd(src, out), env={**os.environ, "QCONVERT_FAULT": "tensor:60"}, capture_output=True)
    assert killed.returncode == -9
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "-g", "32", "--resume",
                                   *_calib(src)])
    assert res.exit_code == 1 and "other settings" in res.output and "group_size" in res.output


def test_resume_on_another_float_path_says_so(tmp_path, src, reference):
    """A run resumed under other CPU kernels (here ATen's scalar ones) goes on, says that the result
    will differ from an uninterrupted run, and its report names each float path with the stages it
    made, across two resumes; an uninterrupted run's report names its one path."""
    import json
    import re

    import torch

    whole = json.loads((reference / "qconvert.json").read_text())["float_path"]
    assert whole.startswith(f"cpu {torch.backends.cpu.get_cpu_capability()} kernels") and torch.__version__ in whole
    out = tmp_path / "out"
    scalar = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    killed = subprocess.run(_quantize_cmd(src, out), env={**os.environ, "QCONVERT_FAULT": "tensor:30"}, capture_output=True)
    assert killed.returncode == -9
    again = subprocess.run(_quantize_cmd(src, out, "--resume"), env={**scalar, "QCONVERT_FAULT": "tensor:40"},
                           capture_output=True, text=True)
    assert again.returncode == -9 and "resuming on another float path" in again.stdout
    done = subprocess.run(_quantize_cmd(src, out, "--resume"), capture_output=True, text=True)  # back on the first path
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming on another float path" in done.stdout and "cpu DEFAULT kernels" in done.stdout
    record = json.loads((out / "qconvert.json").read_text())["float_path"]
    m = re.fullmatch(r"stages 1-(\d+): ([^;]+); stages (\d+)-(\d+): (cpu DEFAULT kernels[^;]+); stages (\d+)-5: ([^;]+)",
                     record)
    assert m, record
    assert int(m[3]) == int(m[1]) + 1 and int(m[6]) == int(m[4]) + 1 and m[2] == m[7] == whole, record


def test_unwritable_output_is_a_clear_error(tmp_path, src):
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", "/proc/qconvert-out", "-q"])
    assert res.exit_code == 1 and "writable" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "no" / "such" / "out"), "-q"])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_damaged_saved_activations_are_detected(tmp_path, src):
    """Activations kept in RAM are saved after each block with a checksum; a torn file is refused."""
    out = tmp_path / "out"
    killed = subprocess.run(_quantize_cmd(src, out), env={**os.environ, "QCONVERT_FAULT": "tensor:75"}, capture_output=True)
    assert killed.returncode == -9
    saved = sorted((tmp_path / "out.partial" / "calib").glob("saved*.f32"))
    assert saved
    for p in saved:
        data = bytearray(p.read_bytes())
        data[100] ^= 0xFF
        p.write_bytes(bytes(data))
    res = subprocess.run(_quantize_cmd(src, out, "--resume"), capture_output=True, text=True)
    assert res.returncode == 1 and "damaged" in res.stderr and "--force" in res.stderr
    assert "Traceback" not in res.stderr


def _kill_refuse_resume(tmp_path, src, options, others, setting, check_partial=None):
    """Quantize whole with ``options``; kill a second run at tensor 60; resuming it with each of
    ``others`` is refused naming ``setting``; resuming with ``options`` gives the same bytes."""
    whole = tmp_path / "whole"
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(whole), "--max-shard-size", SHARD, "-q", *_calib(src),
                                   *options])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    killed = subprocess.run(_quantize_cmd(src, out, *options), env={**os.environ, "QCONVERT_FAULT": "tensor:60"},
                            capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    if check_partial is not None:
        check_partial(tmp_path / "out.partial")
    for other in others:
        res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--max-shard-size", SHARD, "--resume",
                                       "-q", *_calib(src), *other])
        assert res.exit_code == 1 and "other settings" in res.output and setting in res.output, (other, res.output)
    done = subprocess.run(_quantize_cmd(src, out, "--resume", *options), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _files(out) == _files(whole)


def test_rotated_run_resumes_bit_identical_and_not_under_another_rotation(tmp_path, src):
    """--rotate is part of the journal's settings: the same rotation resumes to the bytes of an
    uninterrupted run, another rotation (or none) is refused."""
    _kill_refuse_resume(tmp_path, src, ["--rotate", "hadamard", "--rotate-seed", "1"],
                        (["--rotate", "random", "--rotate-seed", "1"], ["--rotate", "hadamard"],
                         ["--rotate", "hadamard+online", "--rotate-seed", "1"], []), "rotation")


@pytest.mark.parametrize("memory", [None, "1KB"])  # 1KB: both streams' activations kept in files
def test_asymmetric_calibration_resumes_bit_identical(tmp_path, src, memory):
    """--asym-calib keeps a second activation stream (the float model's): it is saved with the
    quantized one, so a killed run resumes to the bytes of an uninterrupted one; a resume
    without the option (or with another alpha) is refused."""
    def has_float_stream(partial):
        assert (partial / "calib" / "float").is_dir()

    _kill_refuse_resume(tmp_path, src, ["--asym-calib", "0.5", *(["--max-memory", memory] if memory else [])],
                        ([], ["--asym-calib", "0.25"]), "asym", has_float_stream)


def test_the_refusal_names_the_setting_the_user_changed():
    """Resuming an illm-w8a8 run with quik-w4a4: the scheme is named, not the calibration default
    (asymmetric calibration) that comes with it; of a nested setting, only what differs."""
    from qconvert.pipeline import _first_difference

    old = {"qconvert_version": "0.4.0", "source": "s", "scheme": "illm-w8a8", "method": "illm",
           "calibration": {"nsamples": 8, "dtype": "float32"}}
    new = {**old, "scheme": "quik-w4a4", "method": "quik", "calibration": {"nsamples": 8, "dtype": "float32", "asym": 0.25}}
    assert _first_difference(old, new) == "scheme: 'illm-w8a8' then, 'quik-w4a4' now"
    new = {**old, "calibration": {"nsamples": 16, "dtype": "float32"}}
    assert _first_difference(old, new) == "calibration: nsamples 8 then, 16 now"
    assert _first_difference(old, {**old, "float_dtype": "float16"}) == "float_dtype: None then, 'float16' now"
