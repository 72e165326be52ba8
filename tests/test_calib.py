"""Calibration token sampling: every source, its determinism, and its errors."""

import sys

import pytest
import torch

from helpers import tiny_config, tiny_tokenizer
from qconvert.calibration_text import CALIB_SOURCES, SELF_BATCH, SELF_GREEDY, calibration_tokens, sample, wikitext_join
from qconvert.errors import QConvertError

C4 = "c4-train.00000-of-01024.first1000.jsonl"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(300)


@pytest.fixture(scope="module")
def c4_file(wiki_test):
    path = wiki_test.parents[1] / "c4-en" / C4
    if not path.is_file():
        pytest.fail(f"{path} is missing: the tests read a C4 excerpt from ../shared/data")
    return path


@pytest.fixture
def wiki_small(wiki_test, tmp_path):
    """The first 300 lines of WikiText-2 test, as a raw file (wiki.train.raw is not in ../shared/data)."""
    path = tmp_path / "wiki.train.raw"
    path.write_text("".join(wiki_test.read_text(encoding="utf-8").splitlines(keepends=True)[:300]), encoding="utf-8")
    return path


@pytest.fixture
def c4_small(c4_file, tmp_path):
    path = tmp_path / "c4.jsonl"
    path.write_text("".join(c4_file.read_text(encoding="utf-8").splitlines(keepends=True)[:40]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config()).eval()


def ids_of(tok, text):
    return tok(text, return_tensors="pt").input_ids[0]


def is_window_of(window, ids):
    n = window.numel()
    starts = (ids[: ids.numel() - n + 1] == window[0]).nonzero()[:, 0]
    return any(torch.equal(ids[s : s + n], window) for s in starts.tolist())


def test_wikitext2_windows_are_slices_of_the_joined_text(tok, wiki_small):
    x = calibration_tokens("wikitext2", tok, 7, 33, seed=3, data_file=wiki_small)
    assert x.shape == (7, 33) and x.dtype == torch.int64
    ids = ids_of(tok, wikitext_join(wiki_small.read_text(encoding="utf-8")))
    assert all(is_window_of(w, ids) for w in x)
    assert len({tuple(w.tolist()) for w in x}) == 7


def test_wikitext2_full_split_file(tok, wiki_test):
    x = calibration_tokens("wikitext2", tok, 3, 128, data_file=wiki_test)
    assert x.shape == (3, 128)


@pytest.mark.parametrize("source, fixture", [("wikitext2", "wiki_small"), ("c4", "c4_small"), ("file", "c4_small")])
def test_deterministic_and_seeded(tok, request, source, fixture):
    path = request.getfixturevalue(fixture)
    a = calibration_tokens(source, tok, 5, 64, seed=1, data_file=path)
    assert torch.equal(a, calibration_tokens(source, tok, 5, 64, seed=1, data_file=path))
    assert not torch.equal(a, calibration_tokens(source, tok, 5, 64, seed=2, data_file=path))


def test_c4_windows_come_from_single_documents(tok, c4_small):
    import json

    docs = [ids_of(tok, json.loads(line)["text"]) for line in c4_small.read_text(encoding="utf-8").splitlines()]
    x = calibration_tokens("c4", tok, 12, 200, seed=5, data_file=c4_small)
    assert x.shape == (12, 200)
    for w in x:
        assert any(d.numel() >= 200 and is_window_of(w, d) for d in docs)


def test_c4_shared_excerpt(tok, c4_file):
    x = calibration_tokens("c4", tok, 16, 512, data_file=c4_file)
    assert x.shape == (16, 512) and x.dtype == torch.int64


def test_c4_skips_short_documents(tok, tmp_path):
    long = "Quantization maps weights to a few bits and keeps the model useful. " * 30
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(f'{{"text": "short {i}"}}\n' for i in range(50)) + f'{{"text": "{long}"}}\n')
    x = calibration_tokens("c4", tok, 10, 40, data_file=path)
    assert all(is_window_of(w, ids_of(tok, long)) for w in x)


def test_c4_no_document_long_enough(tok, tmp_path):
    texts = ["a few words", "a somewhat longer document of several words", "short"]
    path = tmp_path / "short.jsonl"
    path.write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    longest = max(ids_of(tok, t).numel() for t in texts)
    with pytest.raises(QConvertError, match=rf"no document in .*short\.jsonl.*longest has {longest}\).*--seqlen"):
        calibration_tokens("c4", tok, 2, 64, data_file=path)


def test_file_txt_is_one_text_and_jsonl_is_documents(tok, wiki_small, c4_small, tmp_path):
    txt = tmp_path / "notes.txt"
    raw = wiki_small.read_text(encoding="utf-8")
    txt.write_text(raw, encoding="utf-8")
    x = calibration_tokens("file", tok, 4, 50, data_file=txt)
    ids = ids_of(tok, raw)  # not re-joined like WikiText
    assert all(is_window_of(w, ids) for w in x)
    other = tmp_path / "wiki.train.raw"  # any UTF-8 text file, whatever its suffix
    other.write_text(raw, encoding="utf-8")
    assert torch.equal(calibration_tokens("file", tok, 4, 50, data_file=other), x)
    upper = tmp_path / "DOCS.JSONL"  # documents whatever the suffix's case
    upper.write_bytes(c4_small.read_bytes())
    assert torch.equal(calibration_tokens("file", tok, 4, 50, data_file=upper),
                       calibration_tokens("c4", tok, 4, 50, data_file=c4_small))
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes([0xff, 0xfe, 0x00, 0x80]) * 64)
    with pytest.raises(QConvertError, match=r"weights\.bin is not UTF-8 text"):
        calibration_tokens("file", tok, 4, 50, data_file=binary)
    assert torch.equal(calibration_tokens("file", tok, 4, 50, data_file=c4_small),
                       calibration_tokens("c4", tok, 4, 50, data_file=c4_small))


def test_text_too_short(tok, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("only a handful of tokens here")
    n = ids_of(tok, "only a handful of tokens here").numel()
    with pytest.raises(QConvertError, match=rf"has {n} tokens, fewer than one calibration window of 500; lower --seqlen"):
        calibration_tokens("file", tok, 1, 500, data_file=path)
    path.write_text("")  # no --seqlen fits (at least 2): the message says the file is empty instead
    with pytest.raises(QConvertError, match=r"tiny.txt holds no text to calibrate on \(\d tokens\); pass a file with text"):
        calibration_tokens("file", tok, 1, 500, data_file=path)
    docs = tmp_path / "empty.jsonl"
    docs.write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(QConvertError, match=r"every document in .*empty.jsonl is empty or nearly"):
        calibration_tokens("file", tok, 1, 500, data_file=docs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="pile"), "unknown calibration source 'pile'.*wikitext2, c4, file, self"),
    (dict(nsamples=0), "--nsamples must be at least 1"),
    (dict(seqlen=1), "--seqlen must be at least 2"),
    (dict(source="file"), "--calib file needs a text file: pass --data-file"),
    (dict(source="file", data_file="nowhere.txt"), "nowhere.txt not found"),
    (dict(source="file", data_file="docs.json"), r"not a \.json file \(docs\.json\); .* as a \.jsonl file"),
    (dict(source="file", data_file="DOCS.JSON"), r"not a \.json file \(DOCS\.JSON\)"),
    (dict(source="file", data_file="nowhere.raw"), "nowhere.raw not found"),
    (dict(source="c4", data_file="c4.txt"), r"--calib c4 reads \.jsonl files"),
    (dict(source="wikitext2", data_file="nowhere.raw"), "nowhere.raw not found"),
    (dict(source="self"), "no model was given"),
])
def test_argument_errors(tok, kwargs, match):
    args = dict(source="c4", tokenizer=tok, nsamples=2, seqlen=16) | kwargs
    with pytest.raises(QConvertError, match=match):
        calibration_tokens(**args)


def test_bad_jsonl_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(QConvertError, match=r"bad\.jsonl:2: .*'text' field"):
        calibration_tokens("c4", tok, 1, 4, data_file=path)


@pytest.mark.parametrize("source, dataset", [("wikitext2", "WikiText-2 train"), ("c4", "C4 excerpt")])
def test_hub_without_datasets_says_pass_data_file(tok, monkeypatch, source, dataset):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as when not installed
    with pytest.raises(QConvertError, match=f"'datasets' package is not installed.*{dataset}.*--data-file"):
        calibration_tokens(source, tok, 2, 16)


def test_self_shape_determinism_and_first_tokens(tok, tiny_model):
    x = calibration_tokens("self", tok, 3, 24, seed=4, model=tiny_model)
    assert x.shape == (3, 24) and x.dtype == torch.int64
    assert torch.equal(x, calibration_tokens("self", tok, 3, 24, seed=4, model=tiny_model))
    assert not torch.equal(x, calibration_tokens("self", tok, 3, 24, seed=5, model=tiny_model))
    assert int(x.min()) >= 0 and int(x.max()) < len(tok)
    firsts = calibration_tokens("self", tok, 2 * SELF_BATCH * 20 + 7, 2, model=tiny_model)[:, 0]  # 41 batches
    assert firsts.numel() == 2 * SELF_BATCH * 20 + 7
    assert not set(firsts.tolist()) & set(tok.all_special_ids)
    assert len(set(firsts.tolist())) > 250  # uniform over the 299 ordinary ids


def test_self_matches_generation_without_cache(tok, tiny_model):
    """Same draws as a plain loop over the whole prefix: the KV cache and the greedy/sampled split are right."""
    n, seqlen, seed = 5, 20, 7
    x = calibration_tokens("self", tok, n, seqlen, seed=seed, model=tiny_model)
    g = torch.Generator().manual_seed(seed)
    firsts = torch.tensor([i for i in range(len(tok)) if i not in tok.all_special_ids])
    ref = firsts[torch.randint(firsts.numel(), (n,), generator=g)][:, None]
    for t in range(1, seqlen):
        logits = tiny_model(ref).logits[:, -1].float()
        nxt = logits.argmax(-1) if t <= SELF_GREEDY else sample(logits, g)
        ref = torch.cat([ref, nxt[:, None]], 1)
    assert torch.equal(x, ref)


def test_self_errors(tok, tiny_model, tmp_path):
    with pytest.raises(QConvertError, match="reads no data; drop --data-file"):
        calibration_tokens("self", tok, 1, 8, model=tiny_model, data_file=tmp_path / "x.txt")
    with pytest.raises(QConvertError, match="--seqlen 300 is longer than the model's 256 positions"):
        calibration_tokens("self", tok, 1, 300, model=tiny_model)


def test_sources_listed():
    assert CALIB_SOURCES == ("wikitext2", "c4", "file", "self")


def test_default_shape_depends_on_the_source(tmp_path):
    """No --nsamples / --seqlen: 128 x 512 from data, SELF_SHAPE for text the model writes
    (each decode step costs a model forward; docs/accuracy.md measures the shapes); given values
    win, and the model's context still caps the length."""
    from qconvert.calibration_text import DEFAULT_SHAPE, SELF_SHAPE, CalibSettings

    data = tmp_path / "d.txt"
    data.write_text("some text")
    cfg = tiny_config()  # 256 positions
    assert DEFAULT_SHAPE == (128, 512) and SELF_SHAPE[0] * SELF_SHAPE[1] < 128 * 512
    for settings, shape in ((CalibSettings(), SELF_SHAPE), (CalibSettings("self"), SELF_SHAPE),
                            (CalibSettings(data_file=str(data)), DEFAULT_SHAPE),
                            (CalibSettings("c4", str(data)), DEFAULT_SHAPE)):
        got = settings.validated().for_model(type("C", (), {"max_position_embeddings": 4096})())
        assert (got.nsamples, got.seqlen) == shape
        assert got.for_model(cfg).seqlen == shape[1]  # already filled in: kept
        assert settings.validated().for_model(cfg).seqlen == min(shape[1], 256)
    mine = CalibSettings("self", nsamples=7, seqlen=33).validated().for_model(cfg)
    assert (mine.nsamples, mine.seqlen) == (7, 33)
    with pytest.raises(QConvertError, match="--nsamples 0"):
        CalibSettings(nsamples=0).validated()


@pytest.mark.slow
def test_self_on_smollm2(smollm2):
    tok = smollm2.load_tokenizer()
    model = smollm2.load_model()
    x = calibration_tokens("self", tok, 2, 32, seed=1, model=model)
    assert x.shape == (2, 32)
    assert not set(x[:, 0].tolist()) & set(tok.all_special_ids)
    assert torch.equal(x, calibration_tokens("self", tok, 2, 32, seed=1, model=model))
    text = tok.decode(x[0])
    assert len(text.split()) > 5  # words, not a run of one token


def test_sample_draws_from_the_softmax():
    """The CPU sampler (inverse CDF) against the exact probabilities: 40,000 rows of one
    distribution with a zero-probability token at each end and in the middle; every frequency
    within 4.5 standard deviations, the zero-probability tokens never drawn, the seed followed."""
    p = torch.tensor([0.0, 0.5, 0.25, 0.0, 0.125, 0.0625, 0.0625, 0.0])
    logits = p.log().expand(40_000, -1)
    got = sample(logits, torch.Generator().manual_seed(0))
    counts = torch.bincount(got, minlength=p.numel()).double()
    n = got.numel()
    sd = (n * p * (1 - p)).sqrt().clamp_min(1e-9)
    assert ((counts - n * p).abs() <= 4.5 * sd).all(), counts
    assert counts[p == 0].sum() == 0
    assert torch.equal(got, sample(logits, torch.Generator().manual_seed(0)))
    assert not torch.equal(got, sample(logits, torch.Generator().manual_seed(1)))


def test_the_cached_decode_passes_the_cache_by_the_name_the_forward_takes(tiny_llama):
    """Self-written calibration text on transformers' own cache: the logits of a full forward, step by
    step, with the cache passed as ``cache`` where transformers takes it (5.25 deprecates
    ``past_key_values``, to be removed in 5.40: a FutureWarning is an error here)."""
    import warnings

    from transformers import AutoModelForCausalLM

    from qconvert.calibration_text import _cached_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 17, 42, 99, 7, 250]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        steps = torch.stack(list(_cached_logits(model, ids)), 1)
    assert torch.allclose(steps, model(ids).logits[:, :-1], atol=1e-5)
