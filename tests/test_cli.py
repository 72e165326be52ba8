"""The CLI as a user calls it, on tiny random-weight models."""

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import TEXT, tiny_config, write_model
from qconvert.cli import cli


def run(*args, ok=True):
    args = [str(a) for a in args]
    if "quantize" in args and "--scheme" not in args and "--base" not in args:
        args += ["--base", "rtn"]  # these tests are about the CLI; calibration has its own (tests/test_gptq.py)
    res = CliRunner().invoke(cli, args)
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.raw"
    p.write_text(TEXT)
    return p


def test_round_trip_quantize_inspect_eval(tmp_path, tiny_llama, text_file):
    out = tmp_path / "out"
    res = run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-o", out, "-q")
    assert "14 quantized linears" in res.output  # 2 blocks x 7 linears; lm_head kept
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert f"; {on_disk / 1e6:.1f} MB on disk in all" in res.output  # the linears' bytes are not the OUT's
    assert not (tmp_path / "out.partial").exists()
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "qconvert.json", "manifest.json", "tokenizer.json"} <= files
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qconvert" and qc["scheme"] == "is-w4a8-rtn" and qc["format_version"] == 2
    assert "_name_or_path" not in json.loads((out / "config.json").read_text())  # a local path, pushed with OUT
    assert set(qc["modules"].values()) == {"w4a8-is"} and "lm_head" not in qc["modules"]

    table = run("inspect", out).output
    assert "model.layers.1.mlp.down_proj" in table and "2^" in table
    report = json.loads(run("inspect", out, "--json").stdout)
    assert len(report["layers"]) == 14 and all(r["headroom_bits"] > 0 for r in report["layers"])

    q = json.loads(run("eval", out, "--data-file", text_file, "--seqlen", 32, "--max-windows", 3, "--json", "-q", "--device", "cpu").stdout)
    fp = json.loads(run("eval", tiny_llama, "--data-file", text_file, "--seqlen", 32, "--max-windows", 3, "--json", "-q", "--device", "cpu").stdout)
    assert q["windows"] == fp["windows"] == 3 and q["tokens"] == fp["tokens"] and q["scored_tokens"] == 3 * 31
    assert q["kind"] == "qconvert" and fp["kind"] == "safetensors"
    saved = json.loads((out / "eval.json").read_text())
    assert saved == [{**q, "target": "out"}]  # kept for the model card, by name (it is pushed with OUT)
    # a local file is the dataset it is labelled with, with its text's hash: not "wikitext2" for any file
    assert q["dataset"] == Path(text_file).name and len(q["text_sha256"]) == 64
    line = run("eval", out, "--data-file", text_file, "--seqlen", 32, "--max-windows", 3, "-q", "--device", "cpu").output
    assert f"on {Path(text_file).name} (3 windows x 32 tokens; cpu, float32)" in line and "wikitext2" not in line
    # where it ran, kept with the score (no GPU here: the CPU in float32 by default, as --device cpu)
    assert (q["device"], q["dtype"], fp["device"], fp["dtype"]) == ("cpu", "float32", "cpu", "float32")
    assert "device_name" not in q
    assert run("verify", out, "--no-compare").exit_code == 0  # and it does not upset verify
    # a random model is near uniform over its 300 tokens; quantization must not blow it up
    assert 0.8 < q["perplexity"] / fp["perplexity"] < 1.25


def test_eval_device_is_checked_and_kept_with_the_score(tmp_path, tiny_rtn_out, text_file):
    """eval --device: a GPU asked for where none is usable, or a device that is neither, is one line
    before any work; eval.json keeps one row per device type (a GPU's float16 score does not replace the
    CPU's), and the card says where each ran (rows from before --device: the CPU in float32)."""
    import shutil

    from qconvert.bench import gpu_available
    from qconvert.evaluate import save_result
    from qconvert.hub import model_card

    out = tmp_path / "out"
    shutil.copytree(tiny_rtn_out, out)
    args = ["eval", out, "--data-file", text_file, "--seqlen", 32, "--max-windows", 2, "-q"]
    bad = run(*args, "--device", "gpu", ok=False)
    assert bad.exit_code == 1 and "--device gpu: use cpu or cuda" in bad.output and "Traceback" not in bad.output
    if not gpu_available():
        res = run(*args, "--device", "cuda", ok=False)
        assert res.exit_code == 1 and "needs an NVIDIA GPU" in res.output
        assert "`qconvert eval TARGET --device cpu` runs the CPU reference path" in res.output
        assert not (out / "eval.json").exists()
    cpu = json.loads(run(*args, "--device", "cpu", "--json").stdout)
    old = {k: v for k, v in cpu.items() if k not in ("device", "dtype")} | {"windows": 3}  # saved before --device
    save_result(out, old)
    save_result(out, {**cpu, "perplexity": 1.5, "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
                      "dtype": "float16"})
    rows = json.loads((out / "eval.json").read_text())
    assert sorted((r["windows"], r.get("device")) for r in rows) == [(2, "cpu"), (2, "cuda"), (3, None)]
    save_result(out, cpu)  # the same device again replaces its row only
    assert len(json.loads((out / "eval.json").read_text())) == 3
    card = model_card(out, "user/repo")
    assert "| dataset | seqlen | windows | perplexity | run on |" in card
    assert "| 1.500 | cuda (NVIDIA H100 80GB HBM3), float16 |" in card
    assert card.count("| cpu, float32 |") == 2


def test_eval_and_generate_fall_back_to_the_cpu_only_from_a_default_gpu(tmp_path, tiny_rtn_out, text_file, monkeypatch):
    """A GPU that is only the default, where TARGET cannot run (FP8 layers before sm_89: load raises),
    leaves eval and generate on the CPU with a note saying why; --device cuda named keeps the error.
    (The GPU and the load's refusal are simulated: this machine has no GPU.)"""
    import shutil

    import torch

    from qconvert import bench, evaluate
    from qconvert.errors import NoKernel, QConvertError

    out = tmp_path / "out"  # eval keeps its score in OUT: a copy, not the session's OUT
    shutil.copytree(tiny_rtn_out, out)
    real = evaluate.load_model_and_tokenizer
    tried, on_gpu = [], [NoKernel("model.layers.0.mlp.up_proj: the FP8 kernels need compute capability 8.9 or newer "
                                  "(this GPU is 8.0); this OUT runs on CPU only")]

    def load(target, dtype=None, device="cpu", **kw):
        tried.append(device)
        if device != "cpu":
            raise on_gpu[0]
        return real(target, dtype=dtype, device=device, **kw)

    monkeypatch.setattr(bench, "gpu_available", lambda: True)
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", load)
    res = run("eval", out, "--data-file", text_file, "--seqlen", 32, "--max-windows", 2, "-q")
    assert tried == ["cuda", "cpu"]
    assert "Note: model.layers.0.mlp.up_proj: the FP8 kernels need compute capability 8.9" in res.output
    assert "running on the CPU instead" in res.output and "(2 windows x 32 tokens; cpu, float32)" in res.output
    res = run("generate", out, "--prompt", "The quick", "--max-new-tokens", 2)
    assert "running on the CPU instead" in res.output and " on cpu]" in res.output
    tried.clear()
    res = run("eval", out, "--data-file", text_file, "--seqlen", 32, "--device", "cuda", ok=False)
    assert res.exit_code == 1 and tried == ["cuda"] and "this OUT runs on CPU only" in res.output
    assert "instead" not in res.output
    # out of the GPU's memory: the CPU too; any other error is not retried on the CPU
    on_gpu[0] = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    res = run("eval", out, "--data-file", text_file, "--seqlen", 32, "--max-windows", 2, "-q")
    assert f"{out} does not fit in the GPU's memory; running on the CPU instead" in res.output
    tried.clear()
    on_gpu[0] = QConvertError(f"{out}: no tensor for 'model.norm.weight'; the output is incomplete, re-run quantize")
    res = run("eval", out, "--data-file", text_file, "--seqlen", 32, ok=False)
    assert res.exit_code == 1 and tried == ["cuda"] and "instead" not in res.output and "incomplete" in res.output


def test_a_perplexity_that_overflows_is_an_error(tiny_rtn_out):
    """A model whose logits overflow (a float16 model's inf / NaN) is told so in one line (on a GPU
    naming --device cpu); no NaN is returned, so none is saved."""
    import torch
    from transformers import AutoTokenizer

    from helpers import TEXT
    from qconvert.errors import QConvertError
    from qconvert.evaluate import perplexity

    class Overflowing(torch.nn.Module):
        def __init__(self, device):
            super().__init__()
            self.device = torch.device(device)

        def forward(self, ids):
            return type("Out", (), {"logits": torch.full((*ids.shape, 300), float("nan"))})()

    tok = AutoTokenizer.from_pretrained(tiny_rtn_out)
    with pytest.raises(QConvertError, match=r"the mean NLL is nan on cpu: the model overflowed in its float dtype$"):
        perplexity(Overflowing("cpu"), tok, TEXT, seqlen=16, max_windows=1, progress=False)


def test_group_size_option_and_lm_head(tmp_path, tiny_llama):
    out = tmp_path / "g32"
    run("quantize", tiny_llama, "-g", 32, "--quantize-lm-head", "--exclude", "*.k_proj", "-o", out, "-q")
    report = json.loads((out / "qconvert.json").read_text())
    names = [r["name"] for r in report["layers"]]
    assert "lm_head" in names and not any(n.endswith("k_proj") for n in names)
    assert {r["group_size"] for r in report["layers"]} == {32}
    from qconvert import load

    model = load(out)
    ids = torch.tensor([[1, 5, 9, 42]])
    assert torch.isfinite(model(ids).logits).all()


def test_existing_output_needs_force(tmp_path, tiny_llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run("quantize", tiny_llama, "-o", out, "-q", ok=False)
    assert res.exit_code != 0 and "already exists; pass --force" in res.output
    # --force replaces only qconvert outputs (or empty directories), never the user's files
    res = run("quantize", tiny_llama, "-o", out, "-q", "--force", ok=False)
    assert "is not a qconvert output" in res.output and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    run("quantize", tiny_llama, "-o", out, "-q", "--force")
    first = (out / "manifest.json").read_text()
    run("quantize", tiny_llama, "-o", out, "-q", "--force", "-g", "32")
    assert (out / "manifest.json").read_text() != first
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_a_mount_point_output_is_refused_before_any_work(tmp_path, tiny_llama, tiny_rtn_out, monkeypatch):
    """A container's volume given as -o (with --force) cannot be renamed into place: said first, not
    after the whole conversion as a traceback (a read-only tmpfs mount showed it)."""
    vol = tmp_path / "vol"
    vol.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == vol or real(p))
    for args in (("quantize", tiny_llama, "-o", vol, "--force"), ("export", tiny_rtn_out, "-o", vol, "--force")):
        res = run(*args, ok=False)
        assert res.exit_code == 1 and f"-o {vol} is a mount point" in res.output, res.output
        assert f"-o {vol / 'model'}" in res.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["vol"]


def test_a_failed_swap_leaves_the_old_output_and_no_debris(tmp_path, tiny_llama, monkeypatch):
    """The finished OUT.partial cannot be renamed into place: OUT is as it was, the folder moved aside
    comes back, nothing else stays but the finished OUT.partial, which the one-line error names."""
    out = tmp_path / "out"
    run("quantize", tiny_llama, "-o", out, "-q")
    before = (out / "manifest.json").read_text()
    real = os.replace

    def failing(a, b, fail_at):
        if (fail_at == 1 and Path(a) == out) or (fail_at == 2 and Path(a) == tmp_path / "out.partial" and Path(b) == out):
            raise OSError(16, "Device or resource busy")
        return real(a, b)

    for fail_at in (1, 2):  # moving OUT aside, then moving the new one in
        monkeypatch.setattr(os, "replace", lambda a, b, f=fail_at: failing(a, b, f))
        res = run("quantize", tiny_llama, "-o", out, "-q", "--force", "-g", "32", ok=False)
        monkeypatch.setattr(os, "replace", real)
        msg = " ".join(res.output.split())
        assert res.exit_code == 1 and "moving the finished out.partial" in msg and "Device or resource busy" in msg, msg
        assert (out / "manifest.json").read_text() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]
        assert (tmp_path / "out.partial" / "manifest.json").is_file()  # complete, as the message says


def test_output_inside_the_source_is_refused(tmp_path, tiny_llama):
    res = run("quantize", tiny_llama, "-o", tiny_llama, "--force", ok=False)
    assert "choose another -o" in res.output
    assert (tiny_llama / "model.safetensors").exists()


def test_output_inside_a_qconvert_output_is_refused(tmp_path, tiny_llama):
    """A new OUT inside another would leave files the outer manifest does not list (verify
    fails, push uploads both): refused, and the outer OUT is as it was."""
    out = tmp_path / "out"
    run("quantize", tiny_llama, "-o", out, "-q")
    before = sorted(p.name for p in out.iterdir())
    res = run("quantize", tiny_llama, "-o", out / "nested" / "q", "-q", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"-o {out / 'nested' / 'q'} is inside the qconvert output {out}" in " ".join(res.output.split())
    (tmp_path / "link").symlink_to(out)  # through a link too
    res = run("quantize", tiny_llama, "-o", tmp_path / "link" / "q", "-q", ok=False)
    assert res.exit_code == 1 and "is inside the qconvert output" in res.output
    assert sorted(p.name for p in out.iterdir()) == before
    assert run("verify", out, "--no-compare").exit_code == 0


def test_bad_memory_size_is_refused_without_calibration_too(tmp_path, tiny_llama):
    """is-w4a8-rtn does not calibrate, so it never uses the budgets; a typo is still refused."""
    for option in ("--max-memory", "--max-gpu-memory"):
        res = run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", option, "8XB", "-o", tmp_path / "o", ok=False)
        assert res.exit_code == 1 and "cannot read size '8XB'; write it like 2GB" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_already_quantized_source_is_refused(tmp_path, tiny_llama):
    out = tmp_path / "q"
    run("quantize", tiny_llama, "-o", out, "-q")
    res = run("quantize", out, "-o", tmp_path / "qq", ok=False)
    assert "already quantized" in res.output


def test_unknown_scheme_lists_the_known(tmp_path, tiny_llama):
    res = run("quantize", tiny_llama, "--scheme", "w3a3", "-o", tmp_path / "o", ok=False)
    assert "unknown scheme 'w3a3'; known schemes: illm-w4a4, illm-w4a8, illm-w8a8, is-w4a8, is-w4a8-rtn, quik-w4a4, quik-w8a8, w4a16-gptq, w4a16-gptq-zp, w4a8-fs, w8a8, zqfp-w4a8" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_malformed_scheme_toml_is_named(tmp_path, tiny_llama):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nmethod = ")
    res = run("quantize", tiny_llama, "--scheme", bad, "-o", tmp_path / "o", ok=False)
    assert f"scheme file {bad} is not valid TOML" in res.output
    bad.write_text("name = 'x'\nmethod = 'integer-scale'\n[params]\ngroup_size = 3\n")
    res = run("quantize", tiny_llama, "--scheme", bad, "-o", tmp_path / "o", ok=False)
    assert "group_size=3 must be an even integer" in res.output


def test_user_scheme_file(tmp_path, tiny_llama):
    mine = tmp_path / "mine.toml"
    mine.write_text("name = 'mine'\nmethod = 'integer-scale'\nexclude = []\n[params]\ngroup_size = 16\nbase = 'rtn'\n")
    run("quantize", tiny_llama, "--scheme", mine, "-o", tmp_path / "o", "-q")
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert qc["scheme"] == "mine" and qc["config"]["group_size"] == 16 and "lm_head" in qc["modules"]


def test_eval_offline_without_data_file_says_how(tiny_llama):
    res = run("eval", tiny_llama, ok=False)
    assert "--data-file" in res.output and "Traceback" not in res.output


def test_debug_shows_the_traceback(tmp_path):
    res = run("--debug", "quantize", "./nowhere", "-o", tmp_path / "o", ok=False)
    assert res.exception is not None and "not found" in str(res.exception)


def test_nan_weight_is_named_and_nothing_is_written(tmp_path):
    cfg = tiny_config()
    src = write_model(tmp_path / "src", cfg)
    from qconvert.formats.safetensors_io import SafetensorsFile, write_safetensors

    f = SafetensorsFile(src / "model.safetensors")
    state = {n: f.get(n).clone() for n in f.keys()}
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    write_safetensors(src / "model.safetensors", state)
    res = run("quantize", src, "-o", tmp_path / "o", ok=False)
    assert "model.layers.1.mlp.up_proj.weight" in res.output and "NaN" in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_config_that_disagrees_with_the_tensors(tmp_path, tiny_llama):
    import shutil

    d = tmp_path / "wrong"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    res = run("quantize", d, "-o", tmp_path / "o", ok=False)
    assert "config and the tensors disagree" in res.output and "model.layers.2" in res.output
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 2, 128
    (d / "config.json").write_text(json.dumps(cfg))
    res = run("quantize", d, "-o", tmp_path / "o", ok=False)
    assert "has shape" in res.output and not (tmp_path / "o").exists()


def test_schemes_lists_presets():
    out = run("schemes").output
    assert "is-w4a8" in out and "w4a8-fs" in out


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_corrupt_source_safetensors_is_one_line_and_writes_nothing(tmp_path, tiny_llama, cut):
    import shutil

    d = tmp_path / "src"
    shutil.copytree(tiny_llama, d)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:cut])
    res = run("quantize", d, "-o", tmp_path / "o", ok=False)
    assert res.exit_code == 1 and "model.safetensors" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_generate_streams_text_and_reports_speed(tiny_rtn_out):
    from qconvert import load
    from qconvert.generate import generate
    from transformers import AutoTokenizer

    res = run("generate", tiny_rtn_out, "--prompt", "The quick brown", "--max-new-tokens", "6", "--device", "cpu")
    want = generate(load(tiny_rtn_out), AutoTokenizer.from_pretrained(tiny_rtn_out), "The quick brown", max_new_tokens=6)
    assert want.text[0] in res.output and "[qconvert on cpu] prefill" in res.output and "decode" in res.output
    two = run("generate", tiny_rtn_out, "--prompt", "a", "--prompt", "the lazy dog", "--max-new-tokens", "3")
    assert two.output.count("--- ") == 2
    bad = run("generate", tiny_rtn_out, "--prompt", "x", "--chat", ok=False)
    assert bad.exit_code == 1 and "no chat template" in bad.output and "Traceback" not in bad.output


def test_atomic_directory_gives_the_finished_folder_mkdirs_mode(tmp_path):
    """An export (or any folder written through fsutil.atomic_directory) is readable by others as a
    plain mkdir's would be (tempfile.mkdtemp makes 0700): 0777 less the umask."""
    from qconvert.fsutil import atomic_directory

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "exp") as d:
            (d / "f").write_text("x")
        assert (tmp_path / "exp").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        with atomic_directory(tmp_path / "private") as d:
            pass
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old)


def test_busy_cpu_note():
    """qconvert bench on the CPU says its timings are unreliable when the load average passed the
    core count at the start or the end of the run, and says nothing otherwise."""
    from qconvert.cli import _busy_cpu_note

    cpus = os.cpu_count() or 1
    assert _busy_cpu_note(None, None) is None and _busy_cpu_note(cpus - 0.5, cpus) is None
    note = _busy_cpu_note(0.1, cpus + 2.5)
    assert f"load average {cpus + 2.5:.1f} on {cpus} cores" in note and "repeat on an idle machine" in note


def test_generate_on_a_busy_cpu_says_so(tiny_rtn_out, monkeypatch):
    """generate prints tokens/s too: on a busy CPU it adds bench's note; on an idle one, nothing."""
    import qconvert.cli as cli_mod

    cpus = os.cpu_count() or 1
    args = ("generate", tiny_rtn_out, "--prompt", "a", "--max-new-tokens", "2", "--device", "cpu")
    monkeypatch.setattr(cli_mod, "_cpu_load", lambda: cpus + 3.0)
    assert f"Note: the machine was busy during this run (load average {cpus + 3.0:.1f}" in run(*args).output
    monkeypatch.setattr(cli_mod, "_cpu_load", lambda: 0.0)
    assert "busy" not in run(*args).output


def test_the_wrong_kind_of_target_is_named(tmp_path):
    """A SOURCE given where an OUT is wanted, and an export given to export again, are told what they
    are and what to pass instead (they read "has no config.json" and "no qconvert quantization_config")."""
    res = run("inspect", "smollm2-135m", ok=False)
    assert res.exit_code == 1 and "smollm2-135m is not a directory" in res.output
    assert "qconvert quantize smollm2-135m -o OUT" in " ".join(res.output.split())
    ct = tmp_path / "ct"
    ct.mkdir()
    (ct / "config.json").write_text(json.dumps({"model_type": "llama",
                                                "quantization_config": {"quant_method": "compressed-tensors"}}))
    res = run("export", ct, "-o", tmp_path / "again", ok=False)
    msg = " ".join(res.output.split())
    assert res.exit_code == 1 and "is a compressed-tensors checkpoint, not a qconvert output" in msg, msg
    assert "(and exported it from)" in msg and not (tmp_path / "again").exists()


def test_exclude_patterns_that_match_nothing_or_everything_are_refused(tmp_path, tiny_llama):
    """A typo in --exclude quantized what it meant to keep, and '*' wrote an OUT with nothing
    quantized ("0.00x smaller"): both are refused before any work, and nothing is written."""
    res = run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "--exclude", "*.dwn_proj", "-o", tmp_path / "typo", ok=False)
    assert res.exit_code != 0 and "--exclude '*.dwn_proj' matches no linear of this model" in res.output
    assert "model.layers.0.self_attn.q_proj" in res.output and "Traceback" not in res.output
    res = run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "--exclude", "*", "-o", tmp_path / "all", ok=False)
    assert res.exit_code != 0 and "match all 15 linears of this model: nothing is left to quantize" in res.output
    assert not (tmp_path / "typo").exists() and not (tmp_path / "all").exists()
    assert not list(tmp_path.glob("*.partial"))
    # a pattern that matches some linears is taken as before
    run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "--exclude", "*.down_proj", "-o", tmp_path / "ok", "-q")
    assert len(json.loads((tmp_path / "ok" / "config.json").read_text())["quantization_config"]["modules"]) == 12


def test_a_source_with_a_broken_config_or_pickle_weights_gets_one_line(tmp_path, tiny_llama):
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text("{bad json")
    os.link(Path(tiny_llama) / "model.safetensors", bad / "model.safetensors")
    res = run("quantize", bad, "--scheme", "is-w4a8-rtn", "-o", tmp_path / "x", ok=False)
    assert res.exit_code != 0 and f"Error: {bad}/config.json:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()
    # pickle weights: the message names the option only where it exists (quantize)
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text((Path(tiny_llama) / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pkl / "pytorch_model.bin")
    res = run("eval", pkl, "--data-file", bad / "config.json", ok=False)
    assert res.exit_code != 0 and "for qconvert quantize, pass --allow-pickle" in res.output


def test_a_loaded_out_refuses_save_pretrained(tmp_path, tiny_llama):
    """save_pretrained on qconvert.load's model wrote the runtime's buffers with no quantization config,
    a checkpoint transformers loads as random weights: it now says what to use, and writes nothing."""
    import qconvert
    from qconvert.errors import QConvertError

    out = tmp_path / "out"
    run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-o", out, "-q")
    model = qconvert.load(out)
    for call in (lambda: model.save_pretrained(tmp_path / "saved"), lambda: model.push_to_hub("user/repo")):
        with pytest.raises(QConvertError, match="qconvert export .* --format compressed-tensors"):
            call()
    assert not (tmp_path / "saved").exists()
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 300)  # the model itself is untouched


def test_the_python_entry_points_are_the_functions_and_take_dtype_names(tmp_path, tiny_llama):
    """help(qconvert.load) showed only "See qconvert.runtime.load", and load(dtype="bfloat16") failed
    with "Invalid device string" after reading the whole OUT."""
    import inspect

    import qconvert
    from qconvert.errors import QConvertError
    from qconvert.pipeline import quantize
    from qconvert.runtime import load

    assert qconvert.load is load and qconvert.quantize is quantize
    assert "dtype" in inspect.signature(qconvert.load).parameters and "scheme" in inspect.signature(qconvert.quantize).parameters
    out = tmp_path / "out"
    run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-o", out, "-q")
    assert qconvert.load(out, dtype="bfloat16").model.embed_tokens.weight.dtype == torch.bfloat16
    assert qconvert.load(out, dtype="auto").model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(QConvertError, match=r"load\(dtype='int8'\): give torch.float16"):
        qconvert.load(out, dtype="int8")
    with pytest.raises(QConvertError, match=r"force=True"):
        qconvert.quantize(str(tiny_llama), "is-w4a8-rtn", out, progress=False)


def test_the_python_api_takes_calibration_and_parameters_as_dicts(tmp_path, tiny_calib_src, monkeypatch):
    """quantize(calib=) needed a CalibSettings that `qconvert` did not export, method parameters
    (--param, --outliers) had no keyword at all, and progress=False left transformers' bars (reading a
    GGUF file or a checkpoint) on: they are off while it runs, and on again after."""
    from transformers.utils import logging as hf_logging

    import qconvert
    from qconvert.calibration_text import CalibSettings
    from qconvert.errors import QConvertError
    from qconvert import calibration_text

    assert qconvert.CalibSettings is CalibSettings
    bars, real = [], calibration_text.calibration_tokens
    monkeypatch.setattr(calibration_text, "calibration_tokens",
                        lambda *a, **k: bars.append(hf_logging.is_progress_bar_enabled()) or real(*a, **k))
    text = str(tiny_calib_src.parent / "calib.txt")
    out = qconvert.quantize(str(tiny_calib_src), "quik-w4a4", tmp_path / "out", progress=False,
                            calib={"data_file": text, "nsamples": 2, "seqlen": 16}, params={"outliers": 0})
    assert bars and not any(bars) and hf_logging.is_progress_bar_enabled()
    record = json.loads((out / "qconvert.json").read_text())
    assert record["scheme"]["params"]["outliers"] == 0
    assert (record["calibration"]["source"], record["calibration"]["nsamples"], record["calibration"]["seqlen"]) == (
        "file", 2, 16)
    # params= first, as the CLI's --param: a named option wins over it
    both = qconvert.quantize(str(tiny_calib_src), "is-w4a8-rtn", tmp_path / "both", progress=False, group_size=32,
                             params={"group_size": 64})
    assert json.loads((both / "qconvert.json").read_text())["scheme"]["params"]["group_size"] == 32
    for kwargs, match in ((dict(calib={"samples": 2}), r"calib=: no setting 'samples'; the settings: source, data_file"),
                          (dict(calib={"nsamples": "2"}), r"calib=: nsamples must be an int, not '2'"),
                          (dict(calib="c4"), r"calib= takes a dict of calibration settings or a CalibSettings, not str"),
                          (dict(params={"outlier": 4}), r"method 'quik' .* has no parameter 'outlier'")):
        with pytest.raises(QConvertError, match=match):
            qconvert.quantize(str(tiny_calib_src), "quik-w4a4", tmp_path / "bad", progress=False, **kwargs)
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_small_option_and_message_mends(tmp_path, tiny_llama, text_file):
    """--max-shard-size 0 wrote one shard per tensor; an empty eval file was told to lower --seqlen; a
    missing OUT was "not a directory"; Ctrl-C named a literal OUT.partial, whether or not one existed."""
    from qconvert import cli as cli_module
    from qconvert import pipeline

    res = run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "--max-shard-size", "0", "-o", tmp_path / "z", ok=False)
    assert res.exit_code != 0 and "size '0' is zero; give a positive size" in res.output and not (tmp_path / "z").exists()
    out = tmp_path / "out"
    run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-o", out, "-q")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = run("eval", out, "--data-file", empty, ok=False)
    assert res.exit_code != 0 and "the text is empty (0 tokens)" in res.output
    res = run("inspect", tmp_path / "nowhere", ok=False)
    assert res.exit_code != 0 and "nowhere is not a directory (nothing is there)" in res.output
    partial = tmp_path / "kept.partial"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "OPENED_PARTIALS", [tmp_path / "out.partial"])  # the quantize above: renamed into out
        assert cli_module._interrupted_message() == "interrupted"
        partial.mkdir()
        pipeline.OPENED_PARTIALS.append(partial)
        assert cli_module._interrupted_message() == (f"interrupted; the finished blocks are kept in {partial}: repeat the "
                                                     "command with --resume to continue from them")


def test_review_mends_of_the_walkthrough_fixes(tmp_path):
    """An --exclude naming MoE routers (ignore lists do) is no typo; the card's scheme file is TOML for any
    description or parameter; zero is a size for the memory limits; a requests / httpx connection error
    is a network failure to lm-eval's message; a loaded OUT's refusal to save pickles."""
    import pickle
    import tomllib

    from helpers import tiny_moe_config
    from qconvert.calibration_text import CalibSettings
    from qconvert.errors import QConvertError
    from qconvert.hub import _scheme_toml
    from qconvert.lmeval import _network_error
    from qconvert.runtime import _refuse_save
    from qconvert.schemes_registry import Scheme
    from qconvert.skeleton import build_skeleton, target_linears

    model = build_skeleton(tiny_moe_config("mixtral"))
    targets = target_linears(model, ("lm_head", "*.block_sparse_moe.gate"), must_match=("*.block_sparse_moe.gate",))
    assert targets and not any(n.endswith("block_sparse_moe.gate") for n in targets)
    with pytest.raises(QConvertError, match="matches no linear"):
        target_linears(model, ("*.nothing",), must_match=("*.nothing",))
    scheme = Scheme("mine/odd", 'fast 🚀 "q"', "integer-scale", {"group_size": 64, "clip": float("inf"), "l": [1.5, "a"]}, ("lm_head",))
    back = tomllib.loads(_scheme_toml(scheme))
    assert back["description"] == 'fast 🚀 "q"' and back["params"] == {"group_size": 64, "clip": float("inf"), "l": [1.5, "a"]}
    assert CalibSettings(max_memory="0", max_gpu_memory="0GB").validated().memory_budget() == 0
    fake = type("ConnectError", (Exception,), {"__module__": "httpx"})
    assert _network_error(fake()) and _network_error(ConnectionError()) and not _network_error(ValueError())
    refuse = pickle.loads(pickle.dumps(__import__("functools").partial(_refuse_save, str(tmp_path))))
    with pytest.raises(QConvertError, match="cannot be written with save_pretrained"):
        refuse(tmp_path / "x")
