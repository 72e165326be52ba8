"""The decode engine (qconvert/engine.py) and generation (qconvert/generate.py), on CPU.

Reference: transformers' own eager forward with a ``DynamicCache``, one token at a time.

Two comparisons, two tolerances.
- Same arithmetic: transformers given the masks the engine builds (an explicit 4-D additive mask,
  ``logits_to_keep=1``).  The engine then runs exactly transformers' operations on the same
  values (its cache returns strided views of a preallocated tensor where ``DynamicCache`` returns
  concatenated copies; SDPA reads both alike), so the logits must be bit-identical: float and
  every quantized layout, prefill and 40 decode steps.  Any slip in the cache columns, the mask
  or the positions shows here.
- Plain transformers (``model(ids, past_key_values=DynamicCache(), use_cache=True)``, no mask).
  Without a mask SDPA takes another path for GQA (``enable_gqa`` instead of packed query heads)
  and the last bits differ (measured: at most 2.1e-7 on logits of magnitude ~0.5).  Float models:
  ``FLOAT_ATOL`` = 1e-5.  Quantized models quantize each token's activations, and a last-bit
  difference can move one activation across a rounding boundary: one quantum then shifts the
  logits by ~1e-3 and stays in the cache (measured: 1.2e-3 on quik-w8a8, from step 22 on).  So
  quantized models must agree within ``FLIP_ATOL`` = 1e-2 with the same argmax at every step.
- Padded rows against unpadded single rows: the shapes differ (batch, key length), so the
  summation order does too: ``FLOAT_ATOL`` for the float model (of weights std 0.1, where a
  position off by one moves logits by ~0.9), ``FLIP_ATOL`` for quantized ones.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import quantize_tiny, save_pretrained_model, tiny_config, tiny_moe_config, tiny_tokenizer, write_model
from qconvert.engine import DecodeEngine, HostSyncError, host_sync_guard
from qconvert.errors import QConvertError
from qconvert.generate import generate

FLOAT_ATOL = 1e-5
FLIP_ATOL = 1e-2
STEPS = 40
LAYOUTS = {  # OUT name: (scheme, extra CLI arguments); quik calibrates on the tiny text (outliers)
    "w4a8-is": ("is-w4a8", ["-g", "32", "--base", "rtn"]),
    "w4a8-fs": ("w4a8-fs", ["-g", "32", "--base", "rtn"]),
    "w4a16": ("w4a16-gptq", ["-g", "32", "--base", "rtn"]),
    "fp4-fp8": ("zqfp-w4a8", ["-g", "32", "--base", "rtn"]),
    "fp8-fp8": ("zqfp-w8a8", []),
    "w8a8": ("w8a8", ["--base", "rtn"]),
    "quik-w4a4": ("quik-w4a4", ["--outliers", "8"]),
    "quik-w8a8": ("quik-w8a8", ["--outliers", "8"]),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # transformers 5.24 warns that past_key_values is now "cache"
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def outs(tiny_calib_src, tmp_path_factory):
    """One tiny OUT per CPU-runnable layout (2-layer Llama, hidden 64)."""
    base = tmp_path_factory.mktemp("engine-outs")
    made = {}
    for name, (scheme, extra) in LAYOUTS.items():
        res = quantize_tiny(tiny_calib_src, base / name, scheme, *extra)
        assert res.exit_code == 0, res.output + repr(res.exception)
        made[name] = base / name
    return made


def _compare_with_dynamic_cache(model, same_masks: bool, batch=2, prompt=7, vocab=300, seed=0):
    """Prefill + STEPS decode steps, teacher-forced with transformers' greedy tokens.

    ``same_masks``: transformers gets the engine's explicit masks (see the module docstring).
    Returns per-(step, row) max |Δlogit| [STEPS + 1, batch] and whether the argmaxes agreed."""
    from transformers import DynamicCache

    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    minv = torch.finfo(torch.float32).min
    extra = {}
    if same_masks:
        extra = {"logits_to_keep": 1, "attention_mask": torch.full((prompt, prompt), minv).triu(1).expand(batch, 1, prompt, prompt)}
    cache = DynamicCache()
    ref = model(ids, past_key_values=cache, use_cache=True, **extra).logits[:, -1]
    eng = DecodeEngine(model, max_batch=batch + 1, max_len=prompt + STEPS + 3)
    got = eng.prefill(ids)
    diffs, same = [(got - ref).abs().amax(-1)], [torch.equal(got.argmax(-1), ref.argmax(-1))]
    for step in range(STEPS):
        tok = ref.argmax(-1)
        if same_masks:
            extra["attention_mask"] = torch.zeros(batch, 1, 1, prompt + step + 1)
        ref = model(tok[:, None], past_key_values=cache, use_cache=True, **extra).logits[:, -1]
        got = eng.decode(tok)
        diffs.append((got - ref).abs().amax(-1))
        same.append(torch.equal(got.argmax(-1), ref.argmax(-1)))
    assert eng.length == prompt + STEPS
    return torch.stack(diffs), all(same)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gemma2", "gemma3_text", "gemma3_text-linear",
                                  "granite", "olmo2"])
def test_float_model_equals_dynamic_cache(tmp_path, arch):
    arch, _, rope = arch.partition("-")
    cfg = tiny_config(arch)
    if rope:  # as the image-text Gemma-3 (4B and up): the global layers' RoPE scaled linearly
        cfg.rope_parameters["full_attention"].update(rope_type="linear", factor=8.0)
    if getattr(cfg, "sliding_window", None):  # Gemma: the engine runs within the window (it refuses beyond)
        cfg.sliding_window = 64
    model = _hf(write_model(tmp_path / arch, cfg))
    diffs, same = _compare_with_dynamic_cache(model, same_masks=True)
    assert same and float(diffs.max()) == 0.0, diffs.max()
    diffs, same = _compare_with_dynamic_cache(model, same_masks=False)
    assert same and float(diffs.max()) < FLOAT_ATOL, diffs.max()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_quantized_model_equals_dynamic_cache(outs, layout):
    from qconvert import load
    from qconvert.layouts import QuantizedModule

    model = load(outs[layout])
    assert {m.layout for m in model.modules() if isinstance(m, QuantizedModule)} >= {layout}
    diffs, same = _compare_with_dynamic_cache(model, same_masks=True)
    assert same and float(diffs.max()) == 0.0, diffs.max()
    diffs, same = _compare_with_dynamic_cache(model, same_masks=False)
    assert same and float(diffs.max()) < FLIP_ATOL, diffs.max()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_model_runs_eagerly_and_equals_dynamic_cache(tmp_path, kind):
    model = _hf(save_pretrained_model(tmp_path / kind, tiny_moe_config(kind, init_std=0.1)))
    diffs, same = _compare_with_dynamic_cache(model, same_masks=True)
    assert same and float(diffs.max()) == 0.0, diffs.max()
    assert not DecodeEngine(model, 1, 8).graphs
    with pytest.raises(QConvertError, match="experts"):
        DecodeEngine(model, 1, 8, graphs=True)


def _padded_against_single_rows(model, lengths=(3, 11, 6, 1), vocab=300, seed=1):
    """Left-padded batch vs each prompt alone (batch 1, no padding): max |Δlogit| over prefill
    and STEPS decode steps fed the same random tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    p, b = max(lengths), len(lengths)
    ids = torch.zeros(b, p, dtype=torch.int64)
    mask = torch.zeros(b, p, dtype=torch.int64)
    for r, x in enumerate(prompts):
        ids[r, p - len(x):], mask[r, p - len(x):] = x, 1
    feed = torch.randint(0, vocab, (STEPS, b), generator=g)
    batch = DecodeEngine(model, max_batch=b, max_len=p + STEPS)
    single = [DecodeEngine(model, max_batch=1, max_len=len(x) + STEPS) for x in prompts]
    got = [batch.prefill(ids, mask)] + [batch.decode(feed[s]).clone() for s in range(STEPS)]
    worst = 0.0
    for r, (eng, x) in enumerate(zip(single, prompts)):
        alone = [eng.prefill(x[None])] + [eng.decode(feed[s, r:r + 1]).clone() for s in range(STEPS)]
        worst = max(worst, max(float((a[0] - g_[r]).abs().max()) for a, g_ in zip(alone, got)))
        assert all(torch.equal(a[0].argmax(), g_[r].argmax()) for a, g_ in zip(alone, got))
    return worst


def test_padded_rows_equal_unpadded_single_rows(tmp_path, outs):
    from qconvert import load

    cfg = tiny_config()
    cfg.initializer_range = 0.1
    assert _padded_against_single_rows(_hf(write_model(tmp_path / "std01", cfg))) < FLOAT_ATOL
    assert _padded_against_single_rows(load(outs["w4a8-is"])) < FLIP_ATOL
    assert _padded_against_single_rows(load(outs["quik-w4a4"])) < FLIP_ATOL


def test_padding_matters(tiny_llama):
    """The check above can fail: the same left-padded batch without its attention mask (pad
    tokens attended, positions shifted) gives other logits for the padded rows."""
    model = _hf(tiny_llama)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    eng = DecodeEngine(model, 2, 16)
    with_mask = eng.prefill(ids, mask).clone()
    without = eng.prefill(ids)
    assert float((with_mask[0] - without[0]).abs().max()) == 0.0
    assert float((with_mask[1] - without[1]).abs().max()) > 1e-3
    alone = DecodeEngine(model, 1, 16).prefill(ids[1:, 4:])
    assert float((with_mask[1] - alone[0]).abs().max()) < FLOAT_ATOL


# ------------------------------------------------------------------ host syncs


@pytest.mark.parametrize("which", ["float", "w4a8-is", "fp8-fp8"])
def test_decode_step_makes_no_host_sync(tiny_llama, outs, which):
    """The decode step under the strict mock guard: .item(), int(t), bool(t), float(t), tolist(),
    numpy(), nonzero() on any tensor raise.  (quik's CPU reference checks its int32 accumulators
    for overflow with int(t.max()), a sync of the CPU reference only: on CUDA the kernel runs.)"""
    from qconvert import load

    model = _hf(tiny_llama) if which == "float" else load(outs[which])
    ids = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    eng = DecodeEngine(model, 4, 32)
    logits = eng.prefill(ids, mask)
    for _ in range(5):
        with host_sync_guard(strict=True):
            logits = eng.decode(logits.argmax(-1))
    assert eng.length == 10


def test_capture_enters_the_graph_before_the_guard(monkeypatch):
    """``torch.cuda.graph`` synchronizes the device as it starts (and may as it ends): ``capturing``
    enters it first and the guard inside, else every capture would fail with HostSyncError."""
    from qconvert.engine import capturing

    real, seen = torch.cuda.synchronize, []

    class StandIn:  # torch.cuda.graph's entry and exit, as far as syncs go
        def __init__(self, graph, pool=None):
            pass

        def __enter__(self):
            seen.append(torch.cuda.synchronize is real)

        def __exit__(self, *exc):
            seen.append(torch.cuda.synchronize is real)
            return False

    monkeypatch.setattr(torch.cuda, "graph", StandIn)
    with capturing(object(), None):
        with pytest.raises(HostSyncError):
            torch.cuda.synchronize()
    assert seen == [True, True]


def test_capture_step_warms_up_puts_back_then_captures(monkeypatch):
    """``capture_step`` (both engines' capture), its CUDA calls stood in for: the step once on a
    side stream under the guard, then ``after_warm_up``, then the step inside the graph and the
    guard; a new pool only when none is given."""
    from contextlib import nullcontext

    from qconvert.engine import capture_step

    calls = []

    class Stream:
        def __init__(self, *a):
            pass

        def wait_stream(self, other):
            calls.append("wait")

    class StandInGraph:
        def __init__(self, graph, pool=None):
            calls.append(("graph", pool))

        def __enter__(self):
            calls.append("capture")

        def __exit__(self, *exc):
            return False

    for name, value in (("Stream", Stream), ("current_stream", lambda *a: Stream()), ("stream", lambda s: nullcontext()),
                        ("CUDAGraph", lambda: "g"), ("graph_pool_handle", lambda: "new pool"), ("graph", StandInGraph)):
        monkeypatch.setattr(torch.cuda, name, value)

    def step():
        with pytest.raises(HostSyncError):
            torch.cuda.synchronize()
        calls.append("step")

    graph, pool = capture_step(step, torch.device("cpu"), None, lambda: calls.append("put back"))
    assert (graph, pool) == ("g", "new pool")
    assert calls == ["wait", "step", "wait", "put back", ("graph", "new pool"), "capture", "step"]
    assert capture_step(step, torch.device("cpu"), "old pool")[1] == "old pool"


def test_guard_catches_syncs_and_restores_torch(tiny_llama):
    model = _hf(tiny_llama)
    eng = DecodeEngine(model, 1, 16)
    logits = eng.prefill(torch.tensor([[1, 2, 3]]))
    norm = model.model.norm
    original = norm.forward
    norm.forward = lambda x: original(x) * (1.0 if x.abs().max().item() >= 0 else 2.0)
    try:
        with pytest.raises(HostSyncError, match="item"), host_sync_guard(strict=True):
            eng.decode(logits.argmax(-1))
    finally:
        norm.forward = original
    t = torch.tensor([2.0])
    with host_sync_guard(strict=True):
        for bad in (lambda: t.item(), lambda: int(t), lambda: bool(t), lambda: float(t), lambda: t.tolist(),
                    lambda: t.numpy(), lambda: t.nonzero(), lambda: torch.nonzero(t), lambda: torch.cuda.synchronize()):
            with pytest.raises(HostSyncError):
                bad()
        assert torch.equal(t + 1, torch.tensor([3.0])) and t.cpu() is t
    with host_sync_guard():  # default: CUDA tensors only
        assert t.item() == 2.0 and int(t) == 2
    assert t.item() == 2.0 and bool(t) and t.tolist() == [2.0] and torch.nonzero(t).shape == (1, 1)
    assert "item" not in torch.Tensor.__dict__ and torch.cuda.synchronize.__name__ == "synchronize"


# ------------------------------------------------------------------ refusals


def test_refusals(tiny_llama, tiny_calib_src, tmp_path):
    from qconvert import load

    model = _hf(tiny_llama)
    with pytest.raises(QConvertError, match="CUDA graphs need a CUDA device"):
        DecodeEngine(model, 1, 8, graphs=True)
    with pytest.raises(QConvertError, match="computes in torch.float32"):
        DecodeEngine(model, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(QConvertError, match="256 positions"):
        DecodeEngine(model, 1, 1000)
    eng = DecodeEngine(model, 2, 8)
    with pytest.raises(QConvertError, match="decode before prefill"):
        eng.decode(torch.tensor([1]))
    with pytest.raises(QConvertError, match="holds 1 to 2"):
        eng.prefill(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(QConvertError, match="left padding"):
        eng.prefill(torch.zeros(1, 3, dtype=torch.int64), torch.tensor([[1, 0, 1]]))
    logits = eng.prefill(torch.zeros(1, 6, dtype=torch.int64))
    logits = eng.decode(logits.argmax(-1))
    eng.decode(logits.argmax(-1))
    with pytest.raises(QConvertError, match="cache is full"):
        eng.decode(logits.argmax(-1))
    cfg = tiny_config("mistral")
    cfg.sliding_window = 16
    with pytest.raises(QConvertError, match="sliding-window"):
        DecodeEngine(_hf(write_model(tmp_path / "swa", cfg)), 1, 32)
    res = quantize_tiny(tiny_calib_src, tmp_path / "illm", "illm-w8a8", "--no-fsbr")
    assert res.exit_code == 0, res.output
    with pytest.raises(QConvertError, match="integer-only model.*integer=False"):
        DecodeEngine(load(tmp_path / "illm"), 1, 8)
    DecodeEngine(load(tmp_path / "illm", integer=False), 1, 8)  # the float simulation has a cache


# ------------------------------------------------------------------ generate


class _Tok:
    """The tiny tokenizer with a chosen EOS id (and no chat template)."""

    def __init__(self, eos: int | None):
        self.inner = tiny_tokenizer(300)
        self.eos_token_id = eos
        self.pad_token_id = None
        self.chat_template = None

    def __call__(self, text, **kw):
        return self.inner(text, **kw)

    def decode(self, ids, **kw):
        return self.inner.decode(ids, **kw)


def test_generate_greedy_equals_transformers_and_stops_at_eos(tiny_llama):
    model = _hf(tiny_llama)
    model.generation_config.eos_token_id = None
    prompts = ["The quick brown fox", "Integer scales keep group partial sums in int32 and"]
    res = generate(model, _Tok(None), prompts, max_new_tokens=12)
    assert [len(t) for t in res.token_ids] == [12, 12] and res.decode_steps == 11 and not res.graphs
    tok = tiny_tokenizer(300)
    for prompt, ids in zip(prompts, res.token_ids):
        x = tok(prompt, return_tensors="pt").input_ids
        ref = model.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ref[0, x.shape[1]:].tolist() == ids
    assert res.text[0] == tok.decode(res.token_ids[0], skip_special_tokens=True)
    assert res.prefill_tokens_per_s > 0 and res.decode_tokens_per_s > 0
    # row 0 stops at its 4th token when that token is the EOS; row 1 goes on to its own
    eos = res.token_ids[0][3]
    stopped = generate(model, _Tok(eos), prompts, max_new_tokens=12)
    assert stopped.token_ids[0] == res.token_ids[0][:4]
    row1 = res.token_ids[1]
    assert stopped.token_ids[1] == (row1[: row1.index(eos) + 1] if eos in row1 else row1)


def test_generate_sampling_is_seeded_and_streams(tiny_llama):
    model = _hf(tiny_llama)
    model.generation_config.eos_token_id = None
    tok = _Tok(None)
    a = generate(model, tok, ["fox", "dog"], max_new_tokens=10, temperature=1.0, seed=3)
    b = generate(model, tok, ["fox", "dog"], max_new_tokens=10, temperature=1.0, seed=3)
    c = generate(model, tok, ["fox", "dog"], max_new_tokens=10, temperature=1.0, seed=4)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    pieces = {0: [], 1: []}
    eng = DecodeEngine(model, max_batch=4, max_len=32)
    d = generate(eng, tok, ["fox", "dog"], max_new_tokens=10, temperature=1.0, seed=3,
                 stream_callback=lambda r, s: pieces[r].append(s))
    assert d.token_ids == a.token_ids  # a reused engine gives the same result
    assert ["".join(pieces[r]) for r in (0, 1)] == d.text
    with pytest.raises(QConvertError, match="chat template"):
        generate(model, tok, ["fox"], chat=True)
    with pytest.raises(QConvertError, match="max_len 32"):
        generate(eng, tok, ["fox"], max_new_tokens=40)


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(smollm2):
    model, tok = smollm2.load_model(), smollm2.load_tokenizer()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    res = generate(model, tok, prompts, max_new_tokens=20)
    for prompt, ids in zip(prompts, res.token_ids):
        x = tok(prompt, return_tensors="pt").input_ids
        ref = model.generate(x, max_new_tokens=20, do_sample=False)
        assert ids == ref[0, x.shape[1]:].tolist()  # both stop after an EOS, if one comes
    chat = generate(model, tok, ["What is 2 + 2?"], max_new_tokens=8, chat=True)
    assert chat.prompt_tokens[0] > 8 and chat.text[0]
