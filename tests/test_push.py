"""`qconvert push`, its model card, and the source record (Hub id, commit, sha256) in OUT.

OUTs are real: the tiny random Llama quantized with is-w4a8-rtn through the CLI.  The Hub is
either a recorder standing in for HfApi's methods (the success path) or a real HTTP server on
localhost that answers every request with an error (401, 403, gated), so huggingface_hub's own
error handling runs; "no network" is a closed local port.
"""

import hashlib
import http.server
import json
import os
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import TEXT
from qconvert.cli import cli
from qconvert.formats.safetensors_io import ShardedReader
from qconvert.hub import CARD, export_card, model_card
from test_source import _hf_cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot _hf_cache lays out


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def clean_failure(res, *needles):
    """Failed with a one-line message (ClickException), not an exception's traceback."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    for n in needles:
        assert n in res.output, (n, res.output)


def front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("push") / "out"
    run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-o", out, "-q")
    return out


@pytest.fixture
def out(built, tmp_path):
    """A private copy of the built OUT, free to damage."""
    return Path(shutil.copytree(built, tmp_path / "out"))


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    """No --token, no HF_TOKEN, no cached login."""
    import huggingface_hub.constants as c

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    return Path(c.HF_TOKEN_PATH)


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)


def forbid_network(monkeypatch):
    from huggingface_hub import HfApi

    def boom(*a, **k):
        raise AssertionError("the network was used")

    for name in ("create_repo", "create_branch", "create_commit", "upload_folder", "list_repo_refs", "whoami", "repo_info"):
        monkeypatch.setattr(HfApi, name, boom)
    monkeypatch.setattr(socket.socket, "connect", boom)


class Recorder:
    """Stands in for the HfApi methods a push calls; records each call."""

    def __init__(self, monkeypatch, branches=("main",)):
        from huggingface_hub import HfApi

        self.calls = []
        rec = self

        def create_repo(api, repo_id, **kw):
            rec.calls.append(("create_repo", repo_id, kw, api.token))
            return SimpleNamespace(repo_id=repo_id)

        def list_repo_refs(api, repo_id, **kw):
            rec.calls.append(("list_repo_refs", repo_id, kw, api.token))
            return SimpleNamespace(branches=[SimpleNamespace(name=b) for b in branches])

        def create_branch(api, repo_id, **kw):
            rec.calls.append(("create_branch", repo_id, kw, api.token))

        def create_commit(api, repo_id, operations, **kw):
            files = {}
            for op in operations:
                src = op.path_or_fileobj
                files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
            rec.calls.append(("create_commit", repo_id, {**kw, "files": files}, api.token))
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", oid="abc")

        for f in (create_repo, list_repo_refs, create_branch, create_commit):
            monkeypatch.setattr(HfApi, f.__name__, f)

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


@contextmanager
def hub_server(status: int, headers: dict | None = None):
    """A local 'Hub' that answers every request with ``status``; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"error": "You don't have the rights to create a model under this namespace"}).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def point_hub_at(monkeypatch, url):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", url)


# ----------------------------------------------------------------------------- source record


def test_manifest_records_local_source_files(built, tiny_llama):
    info = json.loads((built / "qconvert.json").read_text())["source_info"]
    weights = tiny_llama / "model.safetensors"
    assert info["id"] is None and info["revision"] is None and info["base_model"] is None
    assert info["files"] == {"model.safetensors": {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                                                   "bytes": weights.stat().st_size}}
    assert info["bytes"] == weights.stat().st_size


def _linked_cache(root: Path, repo_id: str, model_dir: Path, readme: str | None) -> Path:
    """The cache as huggingface_hub really lays it out: snapshot files are links into blobs/,
    and an LFS blob is named by the sha256 of its content."""
    snap = _hf_cache(root, repo_id, model_dir)
    blobs = snap.parents[1] / "blobs"
    blobs.mkdir()
    for f in sorted(snap.iterdir()):
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        f.unlink()
        f.symlink_to(os.path.relpath(blob, snap))
    if readme is not None:
        (snap / "README.md").write_text(readme)
    return snap


def test_hub_id_source_records_id_commit_sha256_and_license(tmp_path, tiny_llama, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    _linked_cache(cache, "acme/tiny-llama", tiny_llama, "---\nlicense: apache-2.0\nlanguage: en\n---\n# tiny\n")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    run("quantize", "acme/tiny-llama", "--scheme", "is-w4a8-rtn", "-o", out, "-q")
    report = json.loads((out / "qconvert.json").read_text())
    info = report["source_info"]
    weights = (tiny_llama / "model.safetensors").read_bytes()
    assert report["source"] == "acme/tiny-llama"
    assert info["id"] == info["base_model"] == "acme/tiny-llama" and info["revision"] == COMMIT
    assert info["files"]["model.safetensors"] == {"sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)}
    assert info["license"] == "apache-2.0"

    meta, body = front_matter(model_card(out))
    assert meta["base_model"] == "acme/tiny-llama" and meta["license"] == "apache-2.0"
    assert COMMIT in body and f"--revision {COMMIT}" in body


def test_cached_blob_name_is_taken_as_the_sha256(tmp_path):
    """No second read of a multi-GB file that huggingface_hub already named by its hash."""
    from qconvert.source import file_sha256

    fake = "ab" * 32  # not the content's hash: proves the name is what is used
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / fake).write_bytes(b"weights")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "model.safetensors").symlink_to(Path("..") / "blobs" / fake)
    assert file_sha256(tmp_path / "snap" / "model.safetensors") == fake
    (tmp_path / "plain.safetensors").write_bytes(b"weights")
    assert file_sha256(tmp_path / "plain.safetensors") == hashlib.sha256(b"weights").hexdigest()


@pytest.mark.parametrize("code, needle", [("GatedRepo", "is gated"), ("RepoNotFound", "private")])
def test_gated_or_private_uncached_model_says_how_to_give_a_token(tmp_path, monkeypatch, online, code, needle):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with hub_server(403 if code == "GatedRepo" else 401, {"X-Error-Code": code, "X-Error-Message": "Access denied"}) as url:
        point_hub_at(monkeypatch, url)
        res = run("quantize", "acme/locked", "--scheme", "is-w4a8-rtn", "-o", tmp_path / "out", "-q", ok=False)
    clean_failure(res, "acme/locked", needle, "hf auth login", "HF_TOKEN")


# ----------------------------------------------------------------------------- the card


def test_card_front_matter_and_body(out):
    card = model_card(out)
    meta, body = front_matter(card)
    assert "base_model" not in meta  # a local path is no Hub id
    assert meta["library_name"] == "qconvert" and meta["pipeline_tag"] == "text-generation"
    assert {"quantized", "qconvert", "is-w4a8-rtn", "int4", "w4a8"} <= set(meta["tags"])
    assert "license" not in meta  # the tiny source has no card to take one from
    assert "**is-w4a8-rtn**" in body and "round-to-nearest" in body and "integer group scales" in body
    assert "groups of 128" in body and "int8, dynamic, per-token" in body
    report = json.loads((out / "qconvert.json").read_text())
    assert f"{report['source_info']['bytes']:,} bytes" in body  # size before
    assert f"{(out / 'model.safetensors').stat().st_size:,} bytes" in body  # size after
    assert f"{report['totals']['quantized_bytes']:,} bytes" in body
    assert "qconvert.load(" in body and "export a compressed-tensors copy with `qconvert export OUT --format" in body
    assert "not measured yet" in body and "Not verified yet" in body and "not been benchmarked" in body
    assert str(out.parent) not in card  # no private path goes to the Hub
    assert model_card(out) == card  # pure: the same OUT, the same card
    assert not (out / CARD).exists()


def test_card_shows_saved_eval_verify_and_bench(out, tmp_path):
    text = tmp_path / "text.raw"
    text.write_text(TEXT)
    ev = json.loads(run("eval", out, "--data-file", text, "--seqlen", 32, "--max-windows", 2, "--json", "-q", "--device", "cpu").stdout)
    run("verify", out, "--no-compare")
    assert (out / "eval.json").is_file() and (out / "verify.json").is_file()
    (out / "bench.json").write_text(json.dumps([{
        "kind": "model", "runtime": "cpu-reference", "environment": {"device": "CPU (x86_64, 2 threads)", "date": "2025-01-02T03:04:05Z"},
        "original": "llama", "quantized": {"prefill_tokens": 16, "prefill_tokens_per_s": 123.4,
                                          "decode": [{"batch": 1, "new_tokens": 4, "tokens_per_s": 9.5}]},
        "original_speed": {"prefill_tokens": 16, "prefill_tokens_per_s": 456.7,
                           "decode": [{"batch": 1, "new_tokens": 4, "tokens_per_s": 19.0}]},
        "speedup": {"prefill": 0.27, "decode_batch1": 0.5}}]))
    body = front_matter(model_card(out))[1]
    assert f"{ev['perplexity']:.3f}" in body and "| text.raw | 32 | 2 |" in body   # the file it was measured on
    assert "`qconvert verify` passed" in body
    assert "CPU (x86_64, 2 threads)" in body and "2025-01-02T03:04:05Z" in body and "123.4" in body
    assert "0.50x" in body and "exact CPU reference" in body

    (out / "bench.json").unlink()
    (out / "bench_results.json").write_text(json.dumps({"device": "NVIDIA H100", "date": "2025-02-03",
                                                        "results": [{"M": 16, "speedup": 2.5}]}))
    body = front_matter(model_card(out))[1]
    assert "NVIDIA H100 (2025-02-03)" in body and "| M | speedup |" in body and "| 16 | 2.5 |" in body


# ----------------------------------------------------------------------------- push


def test_dry_run_lists_files_prints_card_and_stays_offline(out, monkeypatch, no_login):
    forbid_network(monkeypatch)
    (out / ".DS_Store").write_bytes(b"x")  # hidden and temporary files never go up
    (out / "notes.tmp").write_text("x")
    res = run("push", out, "acme/tiny-is-w4a8", "--dry-run")
    expected = sorted(p.name for p in out.iterdir() if p.name not in (".DS_Store", "notes.tmp"))
    listed = [line.split()[-1] for line in res.output.splitlines()
              if line.startswith("  ") and "bytes in all" not in line and "(generated card)" not in line]
    assert sorted(listed) == expected
    for name in expected:
        assert f"{(out / name).stat().st_size:,}  {name}" in res.output
    assert "README.md  (generated card)" in res.output and "notes.tmp" not in res.output and ".DS_Store" not in res.output
    card = model_card(out, "acme/tiny-is-w4a8")
    assert card in res.output and "nothing was sent" in res.output
    assert not (out / CARD).exists()


def test_push_is_one_commit_of_every_file_and_the_card(out, monkeypatch, online, no_login):
    rec = Recorder(monkeypatch, branches=("main",))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = run("push", out, "acme/tiny-is-w4a8", "--private", "--revision", "quant", "--token", "hf_test")
    assert [c[0] for c in rec.calls] == ["create_repo", "list_repo_refs", "create_branch", "create_commit"]
    assert all(c[3] == "hf_test" for c in rec.calls)  # --token is the one used
    (_, repo, kw, _), = rec.named("create_repo")
    assert repo == "acme/tiny-is-w4a8" and kw["private"] is True and kw["exist_ok"] is True
    assert rec.named("create_branch")[0][2]["branch"] == "quant"
    (_, _, commit, _), = rec.named("create_commit")
    assert commit["revision"] == "quant"
    files = commit.pop("files")
    assert set(files) == set(before) | {CARD}
    for name in before:
        assert files[name] == (out / name).read_bytes()
    assert files[CARD].decode() == model_card(out, "acme/tiny-is-w4a8")
    assert "created branch quant" in res.output and "commit: https://huggingface.co/acme/tiny-is-w4a8/commit/abc" in res.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # OUT untouched


def test_push_to_main_with_cached_login_and_own_card(out, monkeypatch, online, no_login, tmp_path):
    rec = Recorder(monkeypatch, branches=("main", "quant"))
    no_login.parent.mkdir(parents=True)
    no_login.write_text("hf_cached\n")  # what `hf auth login` leaves behind
    mine = tmp_path / "card.md"
    mine.write_text("---\nlicense: mit\n---\n# my words\n")
    run("push", out, "acme/tiny", "--card", mine)
    assert [c[0] for c in rec.calls] == ["create_repo", "create_commit"]  # no branch work for main
    assert all(c[3] == "hf_cached" for c in rec.calls)
    commit = rec.named("create_commit")[0][2]
    assert commit["revision"] is None and commit["files"][CARD] == mine.read_bytes()
    assert rec.named("create_repo")[0][2]["private"] is False

    rec.calls.clear()
    run("push", out, "acme/tiny", "--revision", "quant")  # an existing branch is not re-created
    assert [c[0] for c in rec.calls] == ["create_repo", "list_repo_refs", "create_commit"]


def test_no_token_is_a_clear_error(out, monkeypatch, online, no_login):
    forbid_network(monkeypatch)
    res = run("push", out, "acme/tiny", ok=False)
    clean_failure(res, "no Hugging Face token", "--token", "HF_TOKEN", "hf auth login")


def test_no_network_is_a_clear_error(out, monkeypatch, online):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    point_hub_at(monkeypatch, f"http://127.0.0.1:{port}")
    res = run("push", out, "acme/tiny", "--token", "hf_test", ok=False)
    clean_failure(res, "cannot reach the Hugging Face Hub", "network", "repeat the push")


def test_offline_mode_is_a_clear_error(out, monkeypatch):
    forbid_network(monkeypatch)
    res = run("push", out, "acme/tiny", "--token", "hf_test", ok=False)  # conftest sets HF_HUB_OFFLINE=1
    clean_failure(res, "HF_HUB_OFFLINE", "--dry-run")


@pytest.mark.parametrize("status, needles", [
    (403, ["acme/tiny", "403", "another user or organization", "write access"]),
    (401, ["401", "invalid or expired", "--token"]),
])
def test_refused_push_is_a_clear_error(out, monkeypatch, online, status, needles):
    with hub_server(status, {"X-Error-Message": "You don't have the rights"}) as url:
        point_hub_at(monkeypatch, url)
        res = run("push", out, "acme/tiny", "--token", "hf_test", ok=False)
    clean_failure(res, *needles)


@pytest.mark.parametrize("damage, needles", [
    ("partial", ["out.partial", "did not finish", "--resume"]),
    ("journal", ["journal", "--resume"]),
    ("qconvert.json", ["qconvert.json is missing", "--force"]),
    ("config.json", ["config.json is missing", "--force"]),
    ("manifest", ["tokenizer.json", "manifest.json", "--force"]),
    ("missing", ["does/not/exist", "not a directory"]),
])
def test_incomplete_out_is_refused(out, monkeypatch, no_login, damage, needles):
    forbid_network(monkeypatch)
    target = out
    if damage == "partial":
        (out.parent / "out.partial").mkdir()
        (out.parent / "out.partial" / ".journal.jsonl").write_text("{}\n")
    elif damage == "journal":
        (out / ".journal.jsonl").write_text("{}\n")
    elif damage == "manifest":
        (out / "tokenizer.json").unlink()
    elif damage == "missing":
        target = out / "does" / "not" / "exist"
    else:
        (out / damage).unlink()
    for extra in ([], ["--dry-run"]):
        clean_failure(run("push", target, "acme/tiny", *extra, ok=False), *needles)


def test_missing_shard_of_a_sharded_out_is_named(tmp_path, tiny_llama, monkeypatch):
    forbid_network(monkeypatch)
    out = tmp_path / "sharded"
    run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-o", out, "--max-shard-size", "100KB", "-q")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    res = run("push", out, "acme/tiny", "--dry-run")
    assert all(s in res.output for s in shards)
    (out / shards[-1]).unlink()
    clean_failure(run("push", out, "acme/tiny", "--dry-run", ok=False), shards[-1], "index", "--force")


def test_bad_repo_id_is_a_clear_error(out, monkeypatch):
    forbid_network(monkeypatch)
    clean_failure(run("push", out, "not a/valid id", "--dry-run", ok=False), "not a valid Hub repo id", "owner/name")


def test_card_of_a_calibrated_out_names_the_data(tmp_path, tiny_llama):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "gptq"
    run("quantize", tiny_llama, "--scheme", "is-w4a8", "--data-file", text, "--nsamples", 4, "--seqlen", 32, "-o", out, "-q")
    meta, body = front_matter(model_card(out))
    assert {"gptq", "is-w4a8", "w4a8"} <= set(meta["tags"])
    assert "GPTQ, calibrated block by block on 4 x 32 tokens of calib.txt" in body
    float_path = json.loads((out / "qconvert.json").read_text())["float_path"]
    assert f"| calibrated on | {float_path} |" in body  # the kernels whose roundings made these tensors


def _card_command_reproduces(tmp_path, source, data, made_with: list) -> str:
    """OUT made by ``made_with`` (quantize arguments after SOURCE); its card's Reproduce command, run
    with the real directories for path/to/, makes the same tensors.  Returns that command."""
    import shlex

    out = tmp_path / "made"
    run("quantize", source, *made_with, "-o", out, "-q")
    body = front_matter(model_card(out))[1]
    command = body.split("## Reproduce")[1].split("```bash\n")[1].split("\n")[0]
    here = command.replace(f"path/to/{source.name}", str(source)).replace("path/to/", f"{data}/")
    run(*shlex.split(here.replace("-o out/", f"-o {tmp_path / 'again'}"))[1:], "-q")
    first, second = ShardedReader(out), ShardedReader(tmp_path / "again")
    assert sorted(first.keys()) == sorted(second.keys())
    assert all(torch.equal(first.get(n), second.get(n)) for n in first.keys())
    return command


def test_card_reproduce_command_reproduces_the_out(tmp_path, tiny_llama):
    """The card's "Reproduce" command carries every option that made OUT (parameters, group size,
    rotation, calibration, excluded modules; the local source and data file by name): run as
    written, with their directories for path/to/, it makes the same tensors.  The export's card
    says the same."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text(TEXT)
    command = _card_command_reproduces(tmp_path, tiny_llama, data, [
        "--scheme", "w4a16-gptq", "--param", "symmetric=false", "-g", 32, "--rotate", "none", "--data-file",
        data / "calib.txt", "--nsamples", 4, "--seqlen", 32, "--seed", 1, "--asym-calib", 0.25, "--quantize-lm-head",
        "--exclude", "*.k_proj"])
    assert command == (f"qconvert quantize path/to/{tiny_llama.name} --scheme w4a16-gptq -g 32 --param symmetric=false "
                       "--quantize-lm-head --exclude '*.k_proj' --rotate none --calib file --data-file "
                       "path/to/calib.txt --nsamples 4 --seqlen 32 --seed 1 --asym-calib 0.25 -o out/")
    run("export", tmp_path / "made", "-o", tmp_path / "ct")
    assert command in front_matter(export_card(tmp_path / "ct"))[1]


def test_card_reproduce_command_under_base_rtn(tmp_path, tiny_llama):
    """Under --base rtn the preset's default rotation is off: an asked-for rotation is named."""
    command = _card_command_reproduces(tmp_path, tiny_llama, tmp_path, [
        "--scheme", "w4a16-gptq", "--base", "rtn", "--rotate", "hadamard", "--rotate-seed", 2])
    assert "--base rtn --rotate hadamard --rotate-seed 2 -o out/" in command


def test_zero_point_preset_is_its_options_and_its_card_names_it(tmp_path, tiny_llama):
    """w4a16-gptq-zp is w4a16-gptq with --param symmetric=false --asym-calib 0.25 (the same tensors);
    its card's command names the preset and no option, and its export is W4A16_ASYM."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text(TEXT)
    calib = ["--data-file", data / "calib.txt", "--nsamples", 4, "--seqlen", 32]
    command = _card_command_reproduces(tmp_path, tiny_llama, data, ["--scheme", "w4a16-gptq-zp", *calib])
    body = front_matter(model_card(tmp_path / "made"))[1]
    assert command == (f"qconvert quantize path/to/{tiny_llama.name} --scheme w4a16-gptq-zp --calib file --data-file "
                       "path/to/calib.txt --nsamples 4 --seqlen 32 -o out/")
    made = tmp_path / "made"
    report = json.loads((made / "qconvert.json").read_text())
    assert {r["layout"] for r in report["layers"]} == {"w4a16-zp"} and report["calibration"]["asym"] == 0.25
    assert report["rotation"]["mode"] == "hadamard"
    run("quantize", tiny_llama, "--scheme", "w4a16-gptq", "--param", "symmetric=false", "--asym-calib", 0.25, *calib,
        "-o", tmp_path / "by-options", "-q")
    first, second = ShardedReader(made), ShardedReader(tmp_path / "by-options")
    assert sorted(first.keys()) == sorted(second.keys())
    assert all(torch.equal(first.get(n), second.get(n)) for n in first.keys())
    assert "compressed-tensors W4A16_ASYM" in run("export", made, "-o", tmp_path / "ct").output
    assert "for vLLM, export a compressed-tensors copy" in body and "transformers cannot load its zero points" in body


# ----------------------------------------------------------------------------- an export


@pytest.fixture
def exported(out, tmp_path):
    """A compressed-tensors export of a private OUT copy, after `qconvert eval` saved a perplexity
    in that OUT, checked for vLLM at export."""
    text = tmp_path / "text.raw"
    text.write_text(TEXT)
    ev = json.loads(run("eval", out, "--data-file", text, "--seqlen", 32, "--max-windows", 2, "--json", "-q", "--device", "cpu").stdout)
    ct = tmp_path / "out-ct"
    run("export", out, "-o", ct, "--target", "vllm:sm90")
    return ct, ev


def test_push_an_export_is_one_commit_with_its_own_card(exported, monkeypatch, online, no_login, tiny_llama):
    """What vLLM and transformers users publish: the export's files and a card that says what it
    is, where it comes from, what its OUT measured and how to load and serve it."""
    ct, ev = exported
    rec = Recorder(monkeypatch)
    before = {p.name: p.stat().st_mtime_ns for p in ct.iterdir()}
    res = run("push", ct, "acme/tiny-ct", "--token", "hf_test")
    (_, repo, commit, _), = rec.named("create_commit")
    files = commit.pop("files")
    assert repo == "acme/tiny-ct" and set(files) == set(before) | {CARD}
    assert "qconvert_export.json" in files and "config.json" in files and "manifest.json" not in files
    assert commit["commit_message"] == f"qconvert is-w4a8-rtn, compressed-tensors: upload {len(files)} files"
    card = files[CARD].decode()
    assert card == export_card(ct, "acme/tiny-ct") and "commit: https://huggingface.co/acme/tiny-ct" in res.output
    meta, body = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"quantized", "compressed-tensors", "qconvert", "is-w4a8-rtn", "int4", "w4a8"} <= set(meta["tags"])
    assert "(`pack-quantized`, W4A8)" in body and "8-bit int, dynamic, per token" in body
    # the tiny Llama's K = 64 and 160: the preset's groups of 128 go out as 4 groups of 32 each
    assert "per group of 32 (qconvert's groups of 128, each written as 4 groups with its scale" in body
    assert "round-to-nearest" in body and "14 linear layers; in full precision: embeddings, norms, lm_head" in body
    assert f"| text.raw | 32 | 2 | {ev['perplexity']:.3f} |" in body and "on the qconvert OUT" in body
    assert "vLLM 0.32.0's rules (vllm:sm90, tensor parallel 1)" in body
    rows = [line.split(" | ") for line in body.splitlines() if "| CompressedTensorsWNA8Int |" in line]
    assert sum(int(r[0].strip("| ")) for r in rows) == 14 and {r[3] for r in rows} == {"warn"}
    assert 'AutoModelForCausalLM.from_pretrained("acme/tiny-ct")' in body and "vllm serve acme/tiny-ct" in body
    assert "qconvert export out/ --format compressed-tensors -o out-ct/ --target vllm:sm90" in body
    assert str(ct.parent) not in card  # no private path in the card
    assert {p.name: p.stat().st_mtime_ns for p in ct.iterdir()} == before  # the export untouched
    record = json.loads(files["qconvert_export.json"])  # nor in the record that goes up
    local = json.loads((ct / "qconvert_export.json").read_text())
    assert local["from"] == str(ct.parent / "out") and local["origin"]["source"] == str(tiny_llama)
    assert record["from"] == "out" and record["out"] == "out-ct" and record["origin"]["source"] == "path/to/llama"
    assert {k: v for k, v in record.items() if k not in ("from", "out", "origin")} == \
        {k: v for k, v in local.items() if k not in ("from", "out", "origin")}
    for name, data in files.items():
        assert str(ct.parent).encode() not in data and str(tiny_llama).encode() not in data, name
    assert "qconvert_export.json  (local paths left out)" in run("push", ct, "acme/tiny-ct", "--dry-run").output


def test_dry_run_of_an_export_stays_offline(exported, monkeypatch, no_login):
    ct, _ = exported
    forbid_network(monkeypatch)
    res = run("push", ct, "acme/tiny-ct", "--dry-run")
    assert export_card(ct, "acme/tiny-ct") in res.output and "nothing was sent" in res.output
    assert "is incomplete" not in res.output and not (ct / CARD).exists()


@pytest.mark.parametrize("damage, needles", [
    ("missing", ["model.safetensors, which the export wrote, is missing", "export it again with `qconvert export"]),
    ("truncated", ["the export wrote", "the file is damaged"]),
    ("no list", ["did not record its files", "--force`"]),
    ("not ct", ["is not a readable compressed-tensors export"]),
])
def test_damaged_export_is_refused(exported, monkeypatch, no_login, damage, needles):
    ct, _ = exported
    forbid_network(monkeypatch)
    if damage == "missing":
        (ct / "model.safetensors").unlink()
    elif damage == "truncated":
        data = (ct / "tokenizer.json").read_bytes()
        (ct / "tokenizer.json").write_bytes(data[:-10])
    else:
        path = ct / ("qconvert_export.json" if damage == "no list" else "config.json")
        doc = json.loads(path.read_text())
        if damage == "no list":
            del doc["files"]  # what an export made before the list was recorded holds
        else:
            doc["quantization_config"]["quant_method"] = "qconvert"
        path.write_text(json.dumps(doc))
    clean_failure(run("push", ct, "acme/tiny-ct", "--dry-run", ok=False), *needles)


def test_local_paths_recorded_elsewhere_go_up_by_name(exported, monkeypatch, no_login, tiny_llama, tmp_path):
    """Records written before the rules (an eval row with its path as given), a calibration file
    and a rotation note that names the source: none of their paths goes up."""
    ct, _ = exported
    forbid_network(monkeypatch)
    marker = json.loads((ct / "qconvert_export.json").read_text())
    data_file = tmp_path / "private" / "calib.txt"
    marker["origin"]["calibration"] = {"source": "file", "data_file": str(data_file), "nsamples": 4, "seqlen": 32}
    marker["origin"]["base"] = "gptq"  # as a calibrated OUT's record has it
    marker["origin"]["rotation_skipped"] = f"not rotated: qconvert does not know how to rotate tensor x of {tiny_llama}"
    marker["eval"] = [{**marker["eval"][0], "target": str(tmp_path / "out")}]
    (ct / "qconvert_export.json").write_text(json.dumps(marker))
    (ct / "eval.json").write_text(json.dumps([{"dataset": "wikitext2", "seqlen": 32, "windows": 2, "perplexity": 9.5,
                                               "target": str(ct)}]))
    from qconvert.hub import upload_files

    files = {f.path_in_repo: f for f in upload_files(ct, export_card(ct))}
    record = json.loads(files["qconvert_export.json"].data)
    assert record["origin"]["calibration"]["data_file"] == "calib.txt"
    assert record["origin"]["rotation_skipped"].endswith("rotate tensor x of path/to/llama")
    assert record["eval"][0]["target"] == "out"
    assert json.loads(files["eval.json"].data)[0]["target"] == "out-ct" and files["eval.json"].note
    card = export_card(ct)
    assert "rotate tensor x of path/to/llama" in card and "4 x 32 tokens of calib.txt" in card
    for name, f in files.items():
        data = f.data if f.local is None else f.local.read_bytes()
        assert str(tmp_path).encode() not in data and str(tiny_llama).encode() not in data, name


def test_push_warns_of_a_path_an_old_out_records(out, monkeypatch, no_login):
    forbid_network(monkeypatch)
    res = run("push", out, "acme/x", "--dry-run")
    assert "warning" not in res.output  # made by this qconvert: config.json names no path
    from qconvert.formats.native import write_manifest

    cfg = json.loads((out / "config.json").read_text())  # as an OUT made before 0.4.0 has it
    (out / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "/home/me/private/model"}))
    write_manifest(out)
    res = run("push", out, "acme/x", "--dry-run")
    assert "warning: config.json records the local path /home/me/private/model" in res.output


def test_a_corrupt_out_is_neither_verified_nor_pushed(out, monkeypatch, no_login):
    """One bit flipped in the weights after a passing verify (the file's size unchanged): verify fails
    and removes the stale passing report, so the card no longer claims a pass, and push refuses on
    the manifest's sha256 before anything goes up, dry run or not."""
    forbid_network(monkeypatch)
    assert run("verify", out, "--no-compare").exit_code == 0 and (out / "verify.json").is_file()
    assert "`qconvert verify` passed" in run("push", out, "acme/tiny", "--dry-run").output
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x10
    w.write_bytes(bytes(data))
    res = run("verify", out, "--no-compare", ok=False)
    assert res.exit_code == 1 and "sha256 differs" in res.output and "removed" in res.output
    assert not (out / "verify.json").exists()
    for extra in ([], ["--dry-run"]):
        clean_failure(run("push", out, "acme/tiny", *extra, ok=False), "model.safetensors", "sha256 differs", "nothing was uploaded")


def test_verify_refuses_a_missing_data_file_first(out, tmp_path):
    clean_failure(run("verify", out, "--data-file", tmp_path / "nope.txt", ok=False), "nope.txt not found", "--data-file")


def test_a_user_scheme_file_is_written_out_on_the_card_and_reproduces(tmp_path, tiny_llama):
    """An OUT made from a user's TOML file: the card's Reproduce block writes that scheme (as OUT records
    it) and runs quantize on it (the bare name was a command that failed: unknown scheme), and the
    two make the same tensors; the headline says the scheme is the user's, with its own description."""
    import shlex

    mine = tmp_path / "mine.toml"
    mine.write_text('name = "mine-g16"\ndescription = "my own g16 RTN"\nmethod = "integer-scale"\nexclude = ["lm_head", "*.k_proj"]\n'
                    '[params]\ngroup_size = 16\nbase = "rtn"\n')
    out = tmp_path / "made"
    run("quantize", tiny_llama, "--scheme", mine, "--rotate", "hadamard", "-o", out, "-q")
    body = front_matter(model_card(out))[1]
    assert "quantized by qconvert with the scheme **mine-g16**: my own g16 RTN." in body
    block = body.split("## Reproduce")[1].split("```bash\n")[1].split("```")[0]
    head, rest = block.split("\n", 1)
    assert head == "cat > mine-g16.toml <<'EOF'"
    toml_text, command = rest.split("EOF\n")
    work = tmp_path / "again"
    work.mkdir()
    (work / "mine-g16.toml").write_text(toml_text)
    command = command.strip()
    assert command == f"qconvert quantize path/to/{tiny_llama.name} --scheme mine-g16.toml --rotate hadamard -o out/"
    args = shlex.split(command.replace(f"path/to/{tiny_llama.name}", str(tiny_llama)).replace("mine-g16.toml", str(work / "mine-g16.toml"))
                       .replace("-o out/", f"-o {work / 'out'}"))[1:]
    run(*args, "-q")
    first, second = ShardedReader(out), ShardedReader(work / "out")
    assert sorted(first.keys()) == sorted(second.keys()) and all(torch.equal(first.get(n), second.get(n)) for n in first.keys())


def test_the_headline_says_what_options_changed_in_the_preset(tmp_path, tiny_llama):
    """-g 32 and --quantize-lm-head on is-w4a8-rtn: the card's first line said "int4 g128" and nothing
    else; it now names the options that changed the preset before quoting the preset's description."""
    out = tmp_path / "g32"
    run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-g", 32, "--quantize-lm-head", "-o", out, "-q")
    body = front_matter(model_card(out))[1]
    assert "with the scheme **is-w4a8-rtn**, changed by `-g 32 --quantize-lm-head` (the preset: Integer Scale" in body
    plain = tmp_path / "plain"
    run("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-o", plain, "-q")
    assert "with the scheme **is-w4a8-rtn**: Integer Scale" in front_matter(model_card(plain))[1]


def test_the_cards_use_code_runs_as_written(built, tiny_calib_src, tmp_path, monkeypatch, capsys):
    """The card's Python block, run as written (snapshot_download answered by the local OUT): it loads
    the model and prints the prompt and the new text, for a transformers model and for I-LLM's
    integer-only model (whose generate is qconvert's own)."""
    import huggingface_hub

    from helpers import quantize_tiny

    illm = tmp_path / "illm"
    assert quantize_tiny(tiny_calib_src, illm, "illm-w8a8").exit_code == 0
    for target, what in ((built, "a transformers causal LM"), (illm, "I-LLM's integer-only model")):
        card = model_card(target, "user/repo")
        code = card.split("```python\n")[1].split("```")[0]
        assert 'snapshot_download("user/repo")' in code and what in code
        monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, _t=target: str(_t))
        capsys.readouterr()
        exec(compile(code, "card", "exec"), {})
        printed = capsys.readouterr().out
        assert printed.startswith("The capital of France is") and len(printed) > len("The capital of France is\n")
        assert "skip_special_tokens=True" in code  # a real tokenizer's BOS is not printed
    # an OUT whose source had no tokenizer: the load alone, with where to take one
    report = json.loads((illm / "qconvert.json").read_text())
    (illm / "qconvert.json").write_text(json.dumps({**report, "tokenizer": False}))
    code = model_card(illm).split("```python\n")[1].split("```")[0]
    assert "AutoTokenizer" not in code and "the source had no tokenizer" in code
