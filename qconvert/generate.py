"""Text generation on the decode engine: prompts in, text and tokens/s out.

    from qconvert.generate import generate
    res = generate(model_or_engine, tokenizer, ["Hello", "The capital of France is"], max_new_tokens=64)
    res.text[0], res.token_ids[0], res.prefill_tokens_per_s, res.decode_tokens_per_s

Prompts of different lengths are left-padded into one batch (``qconvert.engine`` explains why a
padded row computes what it computes alone).  ``temperature`` 0 is greedy (argmax); above 0,
tokens are drawn from softmax(logits / temperature) with a ``torch.Generator`` on the model's
device seeded with ``seed``.  A row stops at its first EOS token (the tokenizer's, and the
model's ``generation_config``'s); the batch stops when every row has, or after
``max_new_tokens``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch

from qconvert.engine import DecodeEngine
from qconvert.errors import QConvertError

EOS_CHECK_EVERY = 8  # decode steps between host reads of "has every row stopped?" (one sync each)


@dataclass
class GenerateResult:
    """What ``generate`` made.

    ``token_ids[r]``: the new tokens of prompt ``r``, up to and including its EOS if one came;
    ``text[r]``: their decoded text (special tokens skipped).  ``prompt_tokens``: prompt lengths.
    ``prefill_tokens_per_s``: prompt tokens (padding not counted) over the prefill's wall time.
    ``decode_tokens_per_s``: rows x decode steps over the decode loop's wall time: the engine's
    throughput (rows that already stopped still ride along in the batch, as in any static batch);
    with CUDA graphs the first step, which captures the graph, is left out of it.
    """

    token_ids: list[list[int]]
    text: list[str]
    prompt_tokens: list[int]
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_steps: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    graphs: bool = False
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def encode_prompts(tokenizer, prompts: list[str], chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt: ``tokenizer(prompt)`` with its default special tokens, or with
    ``chat`` the tokenizer's chat template around a single user turn (generation prompt added)."""
    out = []
    for p in prompts:
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise QConvertError("this tokenizer has no chat template; generate without chat=True (--chat)")
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(p).input_ids
        if not ids:
            raise QConvertError(f"prompt {p!r} has no tokens; give a non-empty prompt")
        out.append(list(ids))
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids int64 [b, P], attention_mask int64 [b, P]): each prompt right-aligned."""
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), p), dtype=torch.int64)
    for r, x in enumerate(prompts):
        ids[r, p - len(x):] = torch.tensor(x, dtype=torch.int64)
        mask[r, p - len(x):] = 1
    return ids, mask


def eos_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS and the model's ``generation_config.eos_token_id`` (an id or a list)."""
    ids = set()
    for v in (getattr(tokenizer, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if v is None:
            continue
        ids.update([v] if isinstance(v, int) else list(v))
    return sorted(ids)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """One generation's state: the engine, the batch, the sampler, the stop tokens, the streamer."""

    def __init__(self, engine, tokenizer, encoded, max_new_tokens, temperature, seed, stream_callback):
        self.engine, self.tok, self.encoded, self.n_new = engine, tokenizer, encoded, max_new_tokens
        self.temperature, self.callback = temperature, stream_callback
        dev = engine.device
        # a tokenizer that names its own stops alone (generate_ids' eos_token_id=) leaves the model's out
        self.stops = eos_ids(tokenizer, None if getattr(tokenizer, "eos_only", False) else engine.model)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad_id if pad_id is not None else (self.stops[0] if self.stops else 0)
        self.b = len(encoded)
        self.gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
        self.stop_t = torch.tensor(self.stops, dtype=torch.int64, device=dev)
        self.out = torch.empty(self.b, max_new_tokens, dtype=torch.int64, device=dev)
        self.streamed = [""] * self.b
        self.criteria = self.prompt = None  # transformers' stopping_criteria, on the prompt ids and the new ones
        self.logits = None  # the last step's

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.temperature, -1)
        return torch.multinomial(probs, 1, generator=self.gen)[:, 0]

    def cut(self, row: list[int]) -> list[int]:
        """A row up to and including its first stop token."""
        return row[: next((i + 1 for i, t in enumerate(row) if t in self.stops), len(row))]

    def stream(self, upto: int, final: bool = False) -> None:
        if self.callback is None:
            return
        for r, row in enumerate(self.out[:, :upto].tolist()):
            text = self.tok.decode(self.cut(row), skip_special_tokens=True)
            # a byte-level token may end inside a character: wait for the rest, unless this is the end
            if len(text) > len(self.streamed[r]) and (final or not text.endswith("\ufffd")):
                self.callback(r, text[len(self.streamed[r]):])
                self.streamed[r] = text

    def stopped(self, upto: int) -> torch.Tensor:
        """bool [b]: the rows whose last token is a stop token, or that ``criteria`` stops."""
        done = torch.isin(self.out[:, upto - 1], self.stop_t)
        if self.criteria is None:
            return done
        criteria = self.criteria if isinstance(self.criteria, (list, tuple)) else [self.criteria]
        ids = torch.cat([self.prompt, self.out[:, :upto]], 1)
        for criterion in criteria:  # transformers takes one callable or a list of them
            hit = torch.as_tensor(criterion(ids, self.logits), dtype=torch.bool, device=done.device)
            done = done | hit.reshape(-1).expand(self.b)
        return done

    def prefill(self) -> tuple[torch.Tensor, float]:
        dev = self.engine.device
        ids, mask = left_pad(self.encoded, self.pad_id)
        _sync(dev)
        t0 = time.perf_counter()
        self.logits = self.engine.prefill(ids.to(dev), mask.to(dev))
        nxt = self.pick(self.logits)
        _sync(dev)
        seconds = time.perf_counter() - t0
        self.out[:, 0] = nxt
        self.stream(1)
        return nxt, seconds

    def decode(self, nxt: torch.Tensor) -> tuple[int, int, float]:
        """Decode steps until every row stopped or ``max_new_tokens``: (steps, timed steps, seconds)."""
        dev, engine = self.engine.device, self.engine
        done = self.stopped(1)
        steps = timed = 0
        t0 = time.perf_counter()
        every = 1 if self.callback is not None or self.criteria is not None else EOS_CHECK_EVERY
        for t in range(1, self.n_new):
            if t % every == 0 and bool(done.all()):
                break
            self.logits = engine.decode(nxt)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), self.pick(self.logits))
            self.out[:, t] = nxt
            done |= self.stopped(t + 1)
            steps += 1
            if steps == 1 and engine.graphs:  # the first step captured the graph: time from here
                _sync(dev)
                t0 = time.perf_counter()
            else:
                timed += 1
            self.stream(t + 1)
        _sync(dev)
        return steps, timed, time.perf_counter() - t0


@torch.inference_mode()
def generate(engine_or_model, tokenizer, prompts: str | list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, stream_callback=None, chat: bool = False) -> GenerateResult:
    """Generate up to ``max_new_tokens`` tokens for each prompt; see the module docstring.

    ``engine_or_model``: a ``DecodeEngine`` (reused: its max_batch / max_len must fit) or a model,
    for which an engine of exactly this batch and length is made: the model's own where it has one
    (``model.decode_engine(max_batch, max_len)``: I-LLM's integer-only model, on its integer KV
    cache), else a ``DecodeEngine``.  ``stream_callback(row, text)``
    receives each row's new text as it is decoded (this reads every step's tokens back to the
    host: one sync per step).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise QConvertError("no prompts given; pass at least one")
    if max_new_tokens < 1:
        raise QConvertError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if temperature < 0:
        raise QConvertError(f"temperature must be 0 (greedy) or positive, not {temperature}")
    encoded = encode_prompts(tokenizer, prompts, chat)
    run, steps, timed, t_prefill, t_decode = _run_encoded(engine_or_model, tokenizer, encoded, max_new_tokens, temperature,
                                                          seed, stream_callback)
    run.stream(steps + 1, final=True)
    token_ids = [run.cut(row) for row in run.out[:, : steps + 1].tolist()]
    n_prompt = [len(x) for x in encoded]
    return GenerateResult(
        token_ids=token_ids, text=[tokenizer.decode(row, skip_special_tokens=True) for row in token_ids],
        prompt_tokens=n_prompt,
        prefill_tokens_per_s=round(sum(n_prompt) / t_prefill, 2) if t_prefill > 0 else float("inf"),
        decode_tokens_per_s=round(run.b * timed / t_decode, 2) if timed and t_decode > 0 else 0.0,
        decode_steps=steps, prefill_seconds=round(t_prefill, 4), decode_seconds=round(t_decode, 4),
        graphs=run.engine.graphs, device=str(run.engine.device),
    )


def _run_encoded(engine_or_model, tokenizer, encoded: list[list[int]], max_new_tokens: int, temperature: float, seed: int,
                 stream_callback, criteria=None, prompt: torch.Tensor | None = None) -> tuple[_Run, int, int, float, float]:
    """Prefill and decode the token lists ``encoded`` (validated options): the run, its decode steps,
    the timed ones, and the prefill's and the decode loop's seconds.  ``criteria(ids, logits)``, if
    given, also stops rows (transformers' ``stopping_criteria``; ``prompt`` is the ids it sees first)."""
    p = max(len(x) for x in encoded)
    if not isinstance(engine_or_model, torch.nn.Module):  # an engine (DecodeEngine, or a model's own)
        if not all(hasattr(engine_or_model, a) for a in ("prefill", "decode", "max_len")):
            raise QConvertError(f"{type(engine_or_model).__name__} is neither a model nor a decode engine; pass "
                                "qconvert.load(OUT), a transformers causal LM or a DecodeEngine")
        engine = engine_or_model
    else:  # a model that brings its own engine (I-LLM's integer-only model) or a transformers one
        make = getattr(engine_or_model, "decode_engine", None)
        engine = (make(len(encoded), p + max_new_tokens) if make is not None
                  else DecodeEngine(engine_or_model, max_batch=len(encoded), max_len=p + max_new_tokens))
    if p + max_new_tokens > engine.max_len:
        raise QConvertError(f"{p} prompt tokens + {max_new_tokens} new ones exceed the engine's max_len {engine.max_len}; "
                            f"make a longer {type(engine).__name__} or ask for fewer tokens")
    run = _Run(engine, tokenizer, encoded, max_new_tokens, temperature, seed, stream_callback)
    if criteria is not None:
        run.criteria, run.prompt = criteria, prompt.to(engine.device)
    nxt, t_prefill = run.prefill()
    steps, timed, t_decode = run.decode(nxt)
    return run, steps, timed, t_prefill, t_decode


GENERATE_IDS_OPTIONS = ("attention_mask", "max_new_tokens", "max_length", "do_sample", "temperature", "eos_token_id",
                        "pad_token_id", "stopping_criteria", "use_cache", "seed")
# transformers options taken only at the value that changes nothing here (any value when not sampling:
# greedy decoding ignores the sampling filters, as transformers does)
NO_OP_OPTIONS = {"num_beams": (1,), "num_return_sequences": (1,), "return_dict_in_generate": (False,),
                 "output_scores": (False,), "output_logits": (False,), "repetition_penalty": (1.0,)}
SAMPLING_FILTERS = {"top_k": (0, None), "top_p": (1.0, None), "min_p": (None, 0.0), "typical_p": (1.0, None)}


def generate_ids(model, input_ids: torch.Tensor, **options) -> torch.Tensor:
    """transformers' ``model.generate(input_ids, ...)`` for a model that brings its own decode engine
    (I-LLM's integer-only model): int64 [B, P + new], each row its (left-padded) prompt, then its new
    tokens up to and including its first EOS (``eos_token_id`` and the model's own) or the step
    ``stopping_criteria(ids, logits)`` stops it at, ``pad_token_id`` after that; the batch stops once
    every row has.  Greedy, or with ``do_sample`` drawn from softmax(logits / ``temperature``) (no
    top-k or top-p), seeded by ``seed``.  Options: ``GENERATE_IDS_OPTIONS``: ``max_new_tokens`` (or
    ``max_length``, prompt included) defaults to the model's ``generation_config``'s, EOS to its EOS
    ids, padding to its pad id (else the EOS); the cache is always used (``use_cache`` changes
    nothing); with no ``attention_mask`` the padding is where ``pad_token_id`` is, as transformers
    infers it, when that is not the EOS.  ``eos_token_id`` given replaces the model's EOS ids; the
    sampling defaults of ``generation_config`` are not read (greedy unless ``do_sample``).  Like
    transformers' result, the ids end at the step the last row stopped at."""
    with torch.inference_mode():
        out = _generate_ids(model, input_ids, options)
    return out.clone()  # an ordinary tensor (made outside inference mode), as transformers returns


def _generate_ids(model, input_ids: torch.Tensor, options: dict) -> torch.Tensor:
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    n_new, temperature, eos, pad = _generate_options(model, ids, options)
    # what _Run reads of a tokenizer; an eos_token_id given replaces the model's
    ids_only = SimpleNamespace(eos_token_id=eos, pad_token_id=pad, eos_only="eos_token_id" in options)
    mask = options.get("attention_mask")
    if mask is None:
        inferable = pad is not None and pad not in eos_ids(ids_only, None) and bool((ids == pad).any())
        mask = (ids != pad) if inferable else torch.ones_like(ids)
    encoded = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.reshape(ids.shape).cpu())]
    if not all(encoded):
        raise QConvertError("a row of input_ids has no tokens under its attention_mask; give every row a prompt")
    run, steps, *_ = _run_encoded(model, ids_only, encoded, n_new, temperature, int(options.get("seed", 0)), None,
                                  options.get("stopping_criteria"), ids)
    new = run.out[:, : steps + 1]
    width = max(len(run.cut(row)) for row in new.tolist())  # EOS seen only every few steps: trim the pad after
    return torch.cat([ids.to(run.out.device), new[:, :width]], dim=1)


def _generate_options(model, ids: torch.Tensor, options: dict) -> tuple[int, float, object, int | None]:
    """``generate_ids``' options checked: (new tokens, temperature (0: greedy), EOS id(s), pad id)."""
    sample = bool(options.get("do_sample"))
    for key in sorted(set(options) - set(GENERATE_IDS_OPTIONS)):
        if key in SAMPLING_FILTERS and not sample:
            continue
        allowed = NO_OP_OPTIONS.get(key) or SAMPLING_FILTERS.get(key)
        if allowed is None or options[key] not in allowed:
            raise QConvertError(
                f"{type(model).__name__}.generate: option {key}={options[key]!r} is not supported (it decodes greedily "
                f"or by temperature sampling); its options: {', '.join(GENERATE_IDS_OPTIONS)}"
                + (f"; {key} only as {' or '.join(map(repr, allowed))}" if allowed else ""))
    config = getattr(model, "generation_config", None)
    n_new = options.get("max_new_tokens")
    if n_new is None and options.get("max_length") is not None:
        n_new = options["max_length"] - ids.shape[1]
    n_new = getattr(config, "max_new_tokens", None) or 20 if n_new is None else n_new
    temperature = options.get("temperature")
    temperature = (1.0 if temperature is None else float(temperature)) if sample else 0.0
    if n_new < 1 or (sample and temperature <= 0):
        raise QConvertError(f"{type(model).__name__}.generate: needs at least 1 new token (max_new_tokens, or a max_length "
                            f"above the prompt's {ids.shape[1]}) and a positive sampling temperature; got {n_new} and "
                            f"{temperature:g}")
    eos = options.get("eos_token_id", getattr(config, "eos_token_id", None))
    return n_new, temperature, eos, options.get("pad_token_id", getattr(config, "pad_token_id", None))
