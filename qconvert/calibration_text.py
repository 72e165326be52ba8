"""Text for evaluation, and token windows for calibration: WikiText-2, C4, local files, or the model itself."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from qconvert.errors import QConvertError
from qconvert.placement import graph_friendly

DATASETS = ("wikitext2",)
CALIB_SOURCES = ("wikitext2", "c4", "file", "self")

C4_SHARD = "en/c4-train.00000-of-01024.json.gz"  # the GPTQ reference's calibration shard
SELF_GREEDY = 4  # LLM-QAT: after the random first token, this many argmax tokens, then sampling
DEFAULT_SHAPE = (128, 512)  # calibration samples x tokens from a dataset or a file
# Text the model writes itself costs a decode step per token: 128 x 128 tokens (a quarter of the
# default's) make the README's first command 200-226 s instead of 626 s on a 2-core CPU, and calibrate
# no worse (is-w4a8 on SmolLM2: 34.67 and 35.36 with seeds 0 and 1, against 36.76 at 128 x 512
# and 36.41 at 64 x 256; docs/accuracy.md)
SELF_SHAPE = (128, 128)
SELF_BATCH = 128  # sequences generated at once for --calib self (one batch at the default shape)
SELF_DTYPE = torch.float32  # the weights and arithmetic of the model writing --calib self text


def _read_jsonl(path: Path) -> list[str]:
    """The ``text`` field of every non-blank line of a JSON-lines file."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise QConvertError(f"{path}:{i}: each line must be a JSON object with a 'text' field") from e
    return texts


def read_text_file(path: Path) -> str:
    if not path.is_file():
        raise QConvertError(f"data file {path} not found; pass an existing file with --data-file")
    if path.suffix.lower() == ".jsonl":
        return "\n\n".join(_read_jsonl(path))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QConvertError(f"{path} is not UTF-8 text") from e


def wikitext_join(raw: str) -> str:
    """The usual protocol: the split's rows (the file's lines) joined with "\\n\\n"."""
    return "\n\n".join(raw.splitlines(keepends=True))


def load_eval_text(dataset: str, data_file: str | os.PathLike | None = None, split: str = "test") -> str:
    """Evaluation text of ``dataset`` from ``data_file`` if given, else from the Hub's datasets."""
    if dataset not in DATASETS:
        raise QConvertError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if data_file is not None:
        text = read_text_file(Path(data_file))
        return wikitext_join(text) if Path(data_file).suffix.lower() != ".jsonl" else text
    hint = (
        f"pass the raw WikiText-2 {split} file with --data-file PATH "
        f"(wiki.{split}.raw from the wikitext-2-raw-v1 release)"
    )
    try:
        import datasets  # optional
    except ImportError:
        raise QConvertError(f"no --data-file given and the 'datasets' package is not installed; {hint}") from None
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as e:  # offline, cache miss, or a Hub error
        raise QConvertError(f"could not fetch WikiText-2 from the Hub ({type(e).__name__}); {hint}") from e
    return "\n\n".join(rows)


# --- calibration corpora: each returns (text or documents, a name for messages) ------------------------


def _local_file(data_file, suffixes: tuple[str, ...], source: str) -> Path:
    path = Path(data_file)
    if path.suffix.lower() not in suffixes:
        raise QConvertError(f"--calib {source} reads {' or '.join(suffixes)} files, not {path.name}; "
                            f"pass such a file with --data-file")
    if not path.is_file():
        raise QConvertError(f"data file {path} not found; pass an existing file with --data-file")
    return path


def _wikitext2_corpus(data_file):
    return load_eval_text("wikitext2", data_file, split="train"), str(data_file or "WikiText-2 train")


def _c4_corpus(data_file):
    if data_file is not None:
        path = _local_file(data_file, (".jsonl",), "c4")
        return _read_jsonl(path), str(path)
    hint = "pass a local C4 excerpt (JSON lines with a 'text' field) with --data-file PATH.jsonl"
    try:
        import datasets  # optional
    except ImportError:
        raise QConvertError(f"no --data-file given and the 'datasets' package is not installed; {hint}") from None
    try:
        rows = datasets.load_dataset("allenai/c4", data_files={"train": C4_SHARD}, split="train")["text"]
    except Exception as e:  # offline, cache miss, or a Hub error
        raise QConvertError(f"could not fetch C4 ({C4_SHARD}) from the Hub ({type(e).__name__}); {hint}") from e
    return list(rows), f"allenai/c4 {C4_SHARD}"


def _file_corpus(data_file):
    if data_file is None:
        raise QConvertError("--calib file needs a text file: pass --data-file PATH.txt (one text) "
                            "or PATH.jsonl (documents, one JSON object with 'text' per line)")
    path = Path(data_file)
    if path.suffix.lower() == ".json":  # one JSON document: not what a line-by-line reader takes
        raise QConvertError(f"--calib file reads plain text or JSON lines, not a .json file ({path.name}); "
                            f"pass its documents one JSON object with 'text' per line as a .jsonl file")
    if not path.is_file():
        raise QConvertError(f"data file {path} not found; pass an existing file with --data-file")
    return (_read_jsonl(path) if path.suffix.lower() == ".jsonl" else read_text_file(path)), str(path)


CORPORA = {"wikitext2": _wikitext2_corpus, "c4": _c4_corpus, "file": _file_corpus}


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0].to(torch.int64)


def _text_windows(ids: torch.Tensor, nsamples: int, seqlen: int, g: torch.Generator, what: str) -> torch.Tensor:
    n = ids.numel()
    if n < 2:  # no --seqlen fits: the smallest is 2
        raise QConvertError(f"{what} holds no text to calibrate on ({n} tokens); pass a file with text in it")
    if n < seqlen:
        raise QConvertError(f"{what} has {n} tokens, fewer than one calibration window of {seqlen}; "
                            f"lower --seqlen (to at most {n}) or pass a longer text")
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=g).tolist()
    return torch.stack([ids[s : s + seqlen] for s in starts])


def _document_windows(docs: list[str], tokenizer, nsamples: int, seqlen: int, g: torch.Generator,
                      what: str) -> torch.Tensor:
    """Pick documents at random until one has ``seqlen`` tokens, then a random window of it; ``nsamples`` times.

    Documents found too short leave the draw (uniform over the long ones all the same), so the loop ends
    after at most ``len(docs)`` rejections.  Only drawn documents are tokenized, each once.
    """
    if not docs:
        raise QConvertError(f"{what} holds no documents; pass a JSON-lines file with one 'text' per line")
    cache: dict[int, torch.Tensor] = {}
    candidates = list(range(len(docs)))
    out = []
    while len(out) < nsamples:
        if not candidates:
            longest = max(t.numel() for t in cache.values())
            if longest < 2:
                raise QConvertError(f"every document in {what} is empty or nearly ({longest} tokens at most); "
                                    "pass documents with text in their 'text' fields")
            raise QConvertError(f"no document in {what} has {seqlen} tokens (the longest has {longest}); "
                                f"lower --seqlen to at most {longest}")
        k = int(torch.randint(len(candidates), (1,), generator=g))
        i = candidates[k]
        if i not in cache:
            cache[i] = _tokenize(tokenizer, docs[i])
        ids = cache[i]
        if ids.numel() < seqlen:
            candidates[k] = candidates[-1]  # drop it in O(1)
            candidates.pop()
            continue
        s = int(torch.randint(ids.numel() - seqlen + 1, (1,), generator=g))
        out.append(ids[s : s + seqlen])
    return torch.stack(out)


@torch.inference_mode()
def _self_generated(model, tokenizer, nsamples: int, seqlen: int, seed: int, progress: bool,
                    use_engine: bool = True) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    g = torch.Generator(device=device).manual_seed(seed)
    vocab = min(len(tokenizer), model.config.vocab_size)  # ids both the tokenizer and the model know
    special = set(tokenizer.all_special_ids)
    firsts = torch.tensor([i for i in range(vocab) if i not in special], device=device)
    engine = _decode_engine(model, min(SELF_BATCH, nsamples), seqlen) if use_engine else None
    with graph_friendly():
        return _generate(model, engine, firsts, g, vocab, nsamples, seqlen, progress)


def _generate(model, engine, firsts, g, vocab: int, nsamples: int, seqlen: int, progress: bool) -> torch.Tensor:
    device = firsts.device
    out = []
    bar = tqdm(total=nsamples * seqlen, desc="calib self", unit="token", disable=not progress)
    for b0 in range(0, nsamples, SELF_BATCH):
        b = min(SELF_BATCH, nsamples - b0)
        ids = torch.empty(b, seqlen, dtype=torch.int64, device=device)
        ids[:, 0] = firsts[torch.randint(firsts.numel(), (b,), generator=g, device=device)]
        bar.update(b)
        steps = _engine_logits(engine, ids) if engine is not None else _cached_logits(model, ids)
        for t, logits in enumerate(steps, 1):  # the logits of position t - 1: they choose token t
            logits = logits[:, :vocab].float()
            if t <= SELF_GREEDY:
                ids[:, t] = logits.argmax(-1)
            else:
                ids[:, t] = sample(logits, g)
            bar.update(b)
        out.append(ids.cpu())
    bar.close()
    return torch.cat(out)


def sample(logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` [b, V], drawn from its softmax (temperature 1).

    On the CPU by the inverse CDF: one uniform u per row, the first token whose cumulative
    probability (float64) exceeds u times the total.  ``torch.multinomial`` draws V exponentials
    per row instead (6.3 M per step at 128 x 49,152, a fifth of SmolLM2's ``--calib self`` time
    on 2 cores); the distribution is the same, the random stream is not.  On CUDA
    ``torch.multinomial`` stays (fast there; ``cumsum`` is not deterministic on CUDA)."""
    if logits.device.type != "cpu":
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
    cdf = torch.softmax(logits.double(), -1).cumsum_(-1)
    u = torch.rand(logits.shape[0], 1, generator=g, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)


def _decode_engine(model, max_batch: int, seqlen: int):
    """The decode engine (static KV cache; one CUDA graph per step on a GPU), or None where it
    does not apply (e.g. sliding-window attention shorter than ``seqlen``): transformers' own
    cache loop then writes the text."""
    from qconvert.engine import DecodeEngine

    try:
        return DecodeEngine(model, max_batch=max_batch, max_len=seqlen)
    except QConvertError:
        return None


def _engine_logits(engine, ids: torch.Tensor):
    """Yields the next-token logits for positions 1 .. L-1 of ``ids`` [b, L]; the caller writes
    ``ids[:, t]`` from the t-th before asking for the next (the engine reads it)."""
    seqlen = ids.shape[1]
    logits = engine.prefill(ids[:, :1])
    for t in range(1, seqlen):
        yield logits
        if t < seqlen - 1:
            logits = engine.decode(ids[:, t])


def _cached_logits(model, ids: torch.Tensor):
    """As ``_engine_logits``, on transformers' dynamic KV cache: passed and read back as ``cache`` where
    the model's forward takes it (transformers 5.25 deprecates ``past_key_values``, to go in 5.40),
    else as ``past_key_values``."""
    from qconvert.engine import keyword_of

    name = keyword_of(model.forward, "cache", "past_key_values") or "past_key_values"
    past = None
    for t in range(1, ids.shape[1]):
        res = model(ids[:, t - 1 : t], **{name: past}, use_cache=True)
        past = getattr(res, name)
        yield res.logits[:, -1]


def calibration_tokens(source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                       data_file: str | os.PathLike | None = None, model=None,
                       progress: bool = False) -> torch.Tensor:
    """int64 [nsamples, seqlen] token ids for calibration, the same for the same arguments.

    Text is tokenized as the GPTQ reference does, ``tokenizer(text).input_ids`` with the tokenizer's
    default special tokens.  Random draws come from ``torch.Generator().manual_seed(seed)``.

    - ``wikitext2``: the train split, from ``data_file`` (raw ``wiki.train.raw``, rows joined with
      "\\n\\n") or else the Hub; tokenized whole, then ``nsamples`` windows with starts uniform in
      ``[0, n_tokens - seqlen]``.
    - ``c4``: documents of a ``.jsonl`` ``data_file`` (a ``text`` per line), or else the Hub shard
      ``allenai/c4`` ``en/c4-train.00000-of-01024.json.gz``.  Per sample: a uniformly random document,
      redrawn while it has fewer than ``seqlen`` tokens, then a uniformly random window of it.
    - ``file``: a ``.txt`` is one text (windows as for wikitext2), a ``.jsonl`` documents (as for c4).
    - ``self`` (data-free, LLM-QAT): ``model`` writes its own text, ``SELF_BATCH`` sequences at a time
      with the KV cache.  Token 0 is uniform over the vocabulary less ``tokenizer.all_special_ids``,
      tokens 1 to ``SELF_GREEDY`` are the argmax, the rest are drawn from the softmax at temperature 1
      (``sample``: inverse CDF on the CPU, ``torch.multinomial`` on CUDA; a generator on the model's
      device, seeded with ``seed``).  Only ids
      that both the tokenizer and the model know are used.  ``model`` must be in eval mode.
    """
    if source not in CALIB_SOURCES:
        raise QConvertError(f"unknown calibration source {source!r} for --calib; known: {', '.join(CALIB_SOURCES)}")
    if nsamples < 1:
        raise QConvertError(f"--nsamples must be at least 1, not {nsamples}")
    if seqlen < 2:
        raise QConvertError(f"--seqlen must be at least 2 tokens, not {seqlen}")
    if tokenizer is None:
        raise QConvertError(f"--calib {source} needs the model's tokenizer; use a source that ships one")
    if source == "self":
        if model is None:
            raise QConvertError("--calib self generates text with the model, but no model was given; "
                                "pass model= (library) or pick a dataset with --calib")
        if data_file is not None:
            raise QConvertError("--calib self reads no data; drop --data-file or pick --calib file")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and seqlen > limit:
            raise QConvertError(f"--seqlen {seqlen} is longer than the model's {limit} positions; lower --seqlen")
        return _self_generated(model, tokenizer, nsamples, seqlen, seed, progress)
    corpus, what = CORPORA[source](data_file)
    g = torch.Generator().manual_seed(seed)
    if isinstance(corpus, str):
        return _text_windows(_tokenize(tokenizer, corpus), nsamples, seqlen, g, what)
    return _document_windows(corpus, tokenizer, nsamples, seqlen, g, what)


CALIB_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def default_shape(source: str) -> tuple[int, int]:
    """(nsamples, seqlen) when --nsamples / --seqlen are not given: SELF_SHAPE for text the model
    writes itself, DEFAULT_SHAPE for every other source."""
    return SELF_SHAPE if source == "self" else DEFAULT_SHAPE


@dataclass(frozen=True)
class CalibSettings:
    """Where GPTQ's calibration tokens come from, and how much RAM their activations may take.

    ``source`` None picks ``file`` when ``data_file`` is given and ``self`` otherwise: a model
    can always be calibrated, with no data at all.  ``max_memory`` (bytes or "8GB") bounds the
    two activation buffers held in RAM; above it they live in files (qconvert.block_walk).
    Default: half of the memory available when the run starts.  ``max_gpu_memory`` bounds the
    activations kept on the GPU when calibration runs there (qconvert/placement.py).
    """

    source: str | None = None
    data_file: str | None = None
    nsamples: int | None = None  # None: DEFAULT_SHAPE[0], SELF_SHAPE[0] for self-written text
    seqlen: int | None = None  # None: DEFAULT_SHAPE[1] (SELF_SHAPE[1]), or the model's context if that is shorter
    seed: int = 0
    max_memory: str | int | None = None
    dtype: str = "float32"  # the blocks' matmuls during calibration: float32, or bfloat16 (autocast)
    max_gpu_memory: str | int | None = None  # None: placement.GPU_FRACTION of the free GPU memory
    asym: float | None = None  # asymmetric calibration (GPTAQ's α): 0 = GPTQ's own, the quantized model's inputs only;
    # None: the scheme's ``asym_calib`` (qconvert.pipeline fills it in once the model's config is read)

    @classmethod
    def of(cls, value) -> "CalibSettings":
        """``value`` as settings: None (the defaults), settings, or a dict of their fields (the
        Python API's ``calib=``, e.g. ``{"source": "c4", "data_file": "c4.jsonl", "nsamples": 64}``)."""
        if value is None or isinstance(value, cls):
            return value or cls()
        if not isinstance(value, Mapping):
            raise QConvertError(f"calib= takes a dict of calibration settings or a CalibSettings, not "
                                f"{type(value).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in value if key not in known)
        if unknown:
            raise QConvertError(f"calib=: no setting {unknown[0]!r}; the settings: {', '.join(known)}")
        for key in ("nsamples", "seqlen", "seed"):
            if value.get(key) is not None and (isinstance(value[key], bool) or not isinstance(value[key], int)):
                raise QConvertError(f"calib=: {key} must be an int, not {value[key]!r}")
        return cls(**value)

    def validated(self) -> "CalibSettings":
        source = self._source()
        if source not in CALIB_SOURCES:
            raise QConvertError(f"unknown calibration source {source!r} (--calib); known: {', '.join(CALIB_SOURCES)}")
        nsamples = self.nsamples if self.nsamples is not None else default_shape(source)[0]
        if nsamples < 1:
            raise QConvertError(f"--nsamples {nsamples}: need at least 1 calibration sample")
        if self.seqlen is not None and self.seqlen < 2:
            raise QConvertError(f"--seqlen {self.seqlen}: calibration samples need at least 2 tokens")
        data_file = str(Path(self.data_file).resolve()) if self.data_file else None
        if data_file and not Path(data_file).is_file():
            raise QConvertError(f"data file {self.data_file} not found; pass an existing file with --data-file")
        if self.asym is not None and not 0.0 <= self.asym <= 1.0:
            raise QConvertError(f"--asym-calib {self.asym}: choose a value from 0 (off) to 1 (the full correction)")
        if self.dtype not in CALIB_DTYPES:
            raise QConvertError(f"--calib-dtype {self.dtype}: choose {' or '.join(CALIB_DTYPES)}")
        from qconvert.fsutil import parse_size

        for size in (self.max_memory, self.max_gpu_memory):
            if size is not None:
                parse_size(size, allow_zero=True)  # 0: keep nothing there (placement's own advice may say 0GB)
        return replace(self, source=source, data_file=data_file, nsamples=nsamples)

    def for_model(self, config) -> "CalibSettings":
        """With the default --seqlen filled in for this model."""
        if self.seqlen is not None:
            return self
        want = default_shape(self._source())[1]
        context = getattr(config, "max_position_embeddings", None) or want
        return replace(self, seqlen=min(want, int(context)))

    def _source(self) -> str:
        """``source``, or what None means: a data file is ``file``, no data ``self``."""
        return self.source or ("file" if self.data_file else "self")

    def key(self) -> dict:
        """What decides the result (the journal and the report record it); not the memory budget."""
        return {"source": self.source, "data_file": self.data_file, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed, "dtype": self.dtype,
                **({"asym": self.asym} if self.asym else {})}  # off: the key of runs from before the option

    @property
    def torch_dtype(self) -> torch.dtype:
        return CALIB_DTYPES[self.dtype]

    def memory_budget(self) -> int:
        if self.max_memory is not None:
            from qconvert.fsutil import parse_size

            return parse_size(self.max_memory, allow_zero=True)
        from qconvert.placement import available_ram

        return available_ram() // 2

    def tokens(self, src, progress: bool = True, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """int64 [nsamples, seqlen] tokens for ``src`` (a qconvert.source.Source), on the CPU.
        ``self``: the model writes them on ``device``, in ``SELF_DTYPE``, whole in memory once."""
        tok = src.load_tokenizer()
        if tok is None:
            raise QConvertError(f"{src.description} has no tokenizer, which calibration needs; "
                                "use a source with tokenizer files, or --base rtn")
        model = None
        if self.source == "self":
            model = src.load_model(SELF_DTYPE).to(device)
        try:
            return calibration_tokens(self.source, tok, self.nsamples, self.seqlen, self.seed,
                                      self.data_file, model=model, progress=progress)
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the walk's blocks and activations get the memory back
