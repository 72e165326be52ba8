"""Residual-stream rotations (QuaRot, SpinQuant) applied to a checkpoint as it is read.

Why rotate: a few channels of an LLM's residual stream carry outliers 100x larger than the
rest, and a per-token or per-group quantizer must stretch its grid over them.  Multiplying the
stream by an orthogonal ``Q`` spreads every outlier over all channels (a Hadamard matrix does it
best: all its entries have the same magnitude ``1/sqrt(n)``), and folding ``Q`` into the weights
makes the rotated model compute exactly the same function, in real arithmetic, as the original.

How, for the RMSNorm architectures qconvert reads (``y = x W^T + b``, ``W [out, in]``, the
residual stream ``x`` a row vector of width H):

  * ``rms(x Q) = rms(x)``, so an RMSNorm commutes with ``Q`` once its weight ``g`` is moved
    into the linears that read it: ``W -> W diag(g)`` and ``g -> 1``;
  * the stream is carried rotated, ``x' = x Q``: the embedding ``E -> E Q``;
  * a *reading* linear (q/k/v, gate/up, MoE routers and experts' gate/up, lm_head) sees
    ``x' = x Q`` and must still compute ``x W^T``: ``W -> W diag(g) Q``;
  * a *writing* linear (o_proj, down_proj, experts' down) must add ``(h W^T + b) Q``:
    ``W -> Q^T W`` and ``b -> Q^T b``;
  * per attention head, V and O share a second rotation ``R [d, d]`` (d = head_dim): each KV
    head's value rows ``W_v[h] -> R^T W_v[h]`` (bias alike), so the head's values come out as
    ``v R``; attention mixes values over positions only, so every query head's output is
    ``a R`` and o_proj undoes it on its input columns, ``W_o[:, h] -> W_o[:, h] R``.  One ``R``
    for all heads keeps this right under GQA, where query heads share a KV head.

Qwen3's q_norm/k_norm act per head on q and k after their projections: the residual rotation
only touches those projections' input side and leaves them alone.  Phi-3 keeps q, k and v in one
``qkv_proj`` (their rows one after the other) and gate and up in one ``gate_up_proj``: the same
transforms, row block by row block.  Gemma-2 / 3 are not accepted here: their norms after
attention and the MLP act on what a block writes to the stream, and do not commute with ``Q``.

``RotatedSource`` wraps any ``qconvert.source.Source`` and returns the rotated tensors, one at
a time, computed in float64 and cast back to each tensor's own dtype, so that the conversion,
calibration, RTN and plain copying all see an ordinary checkpoint of the same architecture.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import torch

from qconvert.errors import OnlineUnsupported, QConvertError, RotationUnsupported
from qconvert.architectures import DECODER_LAYERS
from qconvert.solvers.hadamard import _dense_blocks, _no_hadamard, hadamard, hadamard_factors, has_hadamard  # noqa: F401
from qconvert.source import DerivedSource, Source

MODES = ("hadamard", "random")
# plain RMSNorm(x) * g before each linear; Granite's multipliers are scalars, which commute with Q
ROTATABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "phi3", "granite")
CHUNK_BYTES = 16 << 20  # float64 working set per slice of a tensor being rotated


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise QConvertError(f"rotation seed {seed!r} is not an integer in [0, 2^63); pass a non-negative integer such as 0")
    return seed


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_check_seed(seed))


def _random_signs(n: int, seed: int) -> torch.Tensor:
    """n values +-1 (float64) drawn from ``seed``: integers, the same on every platform."""
    return torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64).to(torch.float64) * 2 - 1


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64 [n, n]) from ``seed``: the Q of the QR of a
    Gaussian matrix drawn in float64 on the CPU, each column's sign set so that R has a positive
    diagonal (the unique QR; without it Q would not be uniformly distributed)."""
    a = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def randomized_hadamard(n: int, seed: int) -> torch.Tensor:
    """``H diag(s)`` with s random +-1 from ``seed`` (float64 [n, n], orthogonal): a Hadamard
    matrix's flat spread of every channel, with the seed choosing one of 2^n of them."""
    return hadamard(n) * _random_signs(n, seed)


def derived_seed(seed: int, purpose: str) -> int:
    """An independent seed for ``purpose`` (e.g. the per-head rotation), platform independent."""
    digest = hashlib.sha256(f"{_check_seed(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Rotation:
    """An orthogonal matrix ``Q [n, n] = (F_1 (x) ... (x) F_m) diag(s)`` kept as its Kronecker
    factors ``F_k`` (each orthonormal, [n_k, n_k]) and optional column signs ``s``.

    ``right(x)`` is ``x @ Q`` at ``n * sum(n_k)`` multiply-adds per row instead of ``n^2``: a
    Hadamard matrix of order 4096 costs two passes of order 64 rather than one of order 4096.
    """

    def __init__(self, factors: list[torch.Tensor], signs: torch.Tensor | None, label: str):
        self.factors = [f.to(torch.float64) for f in factors]
        self.sizes = tuple(f.shape[0] for f in self.factors)
        self.n = math.prod(self.sizes)
        self.signs = signs
        self.label = label

    @classmethod
    def hadamard(cls, n: int, seed: int, what: str) -> "Rotation":
        """``H diag(s)`` (``randomized_hadamard(n, seed)``), factored; ``what`` names n in errors."""
        elementary = hadamard_factors(n)
        if elementary is None:
            raise _no_hadamard(n, what)
        factors = [f / math.sqrt(f.shape[0]) for f in _dense_blocks(elementary)]  # fewer passes, same product
        label = f"randomized Hadamard {n} = {' x '.join(map(str, elementary)) or '1'}"
        return cls(factors or [torch.ones(1, 1, dtype=torch.float64)], _random_signs(n, seed), label)

    @classmethod
    def random(cls, n: int, seed: int) -> "Rotation":
        return cls([random_orthogonal(n, seed)], None, f"random orthogonal {n}")

    def matrix(self) -> torch.Tensor:
        """Q, dense (float64 [n, n])."""
        return self.right(torch.eye(self.n, dtype=torch.float64))

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q`` over the last dimension of float64 ``x [..., n]``.

        With ``x`` viewed as ``[..., n_1, ..., n_m]`` (the index order of a Kronecker product),
        ``x @ (F_1 (x) ... (x) F_m)`` contracts axis k with ``F_k`` on its row index, one axis at a time.
        """
        shape = x.shape
        y = x.reshape(-1, *self.sizes)
        for k, f in enumerate(self.factors):
            y = torch.movedim(torch.movedim(y, k + 1, -1) @ f, -1, k + 1)
        y = y.reshape(shape)
        return y * self.signs if self.signs is not None else y


# ---- which tensor gets which transform -----------------------------------------------------

class Op(Enum):
    COPY = "unchanged"
    ONES = "a folded norm: all ones"
    EMBED = "E Q"
    READ = "W diag(g) Q"
    READ_V = "R^T W diag(g) Q per KV head"
    READ_QKV = "W diag(g) Q; the value rows also R^T per KV head"
    BIAS_V = "R^T b per KV head"
    WRITE = "Q^T W"
    WRITE_O = "Q^T W R per head"
    BIAS_WRITE = "Q^T b"


ROW_WISE = (Op.EMBED, Op.READ)  # each output row from its own input row: streamable in any slices


@dataclass(frozen=True)
class Recipe:
    op: Op
    source: str  # the source tensor it is computed from
    norm: str | None = None  # the RMSNorm weight g folded in (READ, READ_V)


_LAYER = re.compile(rf"^({re.escape(DECODER_LAYERS)}\.\d+\.)(.+)$")
# dense MLPs, MoE experts, Qwen2-MoE's shared expert and routers; see qconvert.moe for the names
_MLP = re.compile(r"^(?:mlp|block_sparse_moe)\.(?:experts\.\d+\.|shared_expert\.)?"
                  r"(gate_proj|up_proj|gate_up_proj|down_proj|w1|w2|w3|gate|shared_expert_gate)\.(weight|bias)$")
_MLP_WRITES = ("down_proj", "w2")
_IN_LAYER = {  # name inside a layer, outside its MLP -> (op, the norm folded in)
    "input_layernorm.weight": (Op.ONES, None),
    "post_attention_layernorm.weight": (Op.ONES, None),
    "self_attn.q_proj.weight": (Op.READ, "input_layernorm.weight"),
    "self_attn.k_proj.weight": (Op.READ, "input_layernorm.weight"),
    "self_attn.v_proj.weight": (Op.READ_V, "input_layernorm.weight"),
    "self_attn.q_proj.bias": (Op.COPY, None),
    "self_attn.k_proj.bias": (Op.COPY, None),
    "self_attn.v_proj.bias": (Op.BIAS_V, None),
    "self_attn.o_proj.weight": (Op.WRITE_O, None),
    "self_attn.o_proj.bias": (Op.BIAS_WRITE, None),
    "self_attn.qkv_proj.weight": (Op.READ_QKV, "input_layernorm.weight"),  # Phi-3: q, k and v rows in one
    "self_attn.q_norm.weight": (Op.COPY, None),  # Qwen3: per head, after the projection
    "self_attn.k_norm.weight": (Op.COPY, None),
}
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"


def _recipe(name: str, tied: bool) -> Recipe | None:
    if name == EMBED:
        return Recipe(Op.EMBED, name)
    if name == FINAL_NORM:
        return Recipe(Op.ONES, name)
    if name == HEAD:  # a tied head is the embedding, whatever else a checkpoint stores
        return Recipe(Op.READ, EMBED if tied else HEAD, FINAL_NORM)
    m = _LAYER.match(name)
    if m is None:
        return None
    prefix, inner = m.groups()
    if inner in _IN_LAYER:
        op, norm = _IN_LAYER[inner]
        return Recipe(op, name, prefix + norm if norm else None)
    mm = _MLP.match(inner)
    if mm is None:
        return None
    linear, kind = mm.groups()
    if linear in _MLP_WRITES:
        return Recipe(Op.WRITE if kind == "weight" else Op.BIAS_WRITE, name)
    return Recipe(Op.READ, name, prefix + "post_attention_layernorm.weight") if kind == "weight" else Recipe(Op.COPY, name)


def _slices(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, align: int = 1,
            budget: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """``fn`` applied to float64 slices of x's rows (whole groups of ``align`` rows, about
    ``budget`` bytes of float64 each), each result cast to ``dtype``."""
    rows = x.shape[0]
    width = max(1, x[0].numel()) if rows else 1
    step = max(align, budget // (8 * width) // align * align)
    for r0 in range(0, rows, step):
        yield fn(x[r0 : r0 + step].to(torch.float64)).to(dtype)


def _map_rows(x, fn, dtype, align=1, budget=CHUNK_BYTES) -> torch.Tensor:
    """All of ``_slices`` in one tensor, filled in place (no float64 copy of the whole)."""
    out, r0 = None, 0
    for y in _slices(x, fn, dtype, align, budget):
        if out is None:
            out = torch.empty((x.shape[0], *y.shape[1:]), dtype=dtype)
        out[r0 : r0 + len(y)] = y
        r0 += len(y)
    return out if out is not None else torch.empty(x.shape, dtype=dtype)


class RotatedSource(DerivedSource):
    """``src`` with the residual stream rotated (see the module docstring): the same
    architecture and tensor names, norms folded into the linears (weights all ones), the same
    function in float.  ``mode`` "hadamard" rotates by ``H diag(s)`` (random signs s from
    ``seed``), "random" by Haar-random orthogonal matrices from ``seed``; the per-head V/O
    rotation is drawn likewise from ``derived_seed(seed, "per-head")``.

    A tied head whose final norm weight is not all ones becomes ``E diag(g) Q``, no longer
    the embedding ``E Q``: then ``untied`` is True, ``keys()`` lists ``lm_head.weight`` and the
    config says ``tie_word_embeddings = False``.  Each tensor is computed in float64 and stored
    in its source dtype; the embedding and the head stream slice by slice through ``iter_rows``.
    """

    def __init__(self, src: Source, mode: str = "hadamard", seed: int = 0, chunk_bytes: int = CHUNK_BYTES,
                 online: bool = False):
        if mode not in MODES:
            raise QConvertError(f"unknown rotation {mode!r}; known: {', '.join(MODES)}")
        super().__init__(src)
        self.mode, self.seed, self.chunk_bytes = mode, _check_seed(seed), chunk_bytes
        cfg = src.config
        model_type = getattr(cfg, "model_type", None)
        if model_type not in ROTATABLE_MODEL_TYPES:
            raise RotationUnsupported(f"rotation does not support model type {model_type!r} (its norms would not fold); "
                                      f"supported: {', '.join(ROTATABLE_MODEL_TYPES)}; convert without --rotate")
        family = getattr(src, "family", None)  # an image-text checkpoint's language model (qconvert.source)
        if family is not None and not family.writes:
            raise RotationUnsupported(f"rotation does not support a {family.model_type} checkpoint's language model: "
                                      "qconvert does not know which of its projector's linears writes the image "
                                      "features into the residual stream; convert without --rotate")
        self.hidden = int(cfg.hidden_size)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden // self.heads)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        names = list(src.keys())
        self._recipes: dict[str, Recipe] = {}
        for name in names:
            recipe = _recipe(name, self.tied)
            if recipe is None:
                raise RotationUnsupported(f"rotation does not know how to rotate tensor '{name}' of {src.description}; "
                                          "convert without --rotate")
            self._recipes[name] = recipe
        missing = sorted({r.norm for r in self._recipes.values() if r.norm} - set(names))
        if EMBED not in names or missing:
            raise QConvertError(f"{src.description} lacks '{EMBED if EMBED not in names else missing[0]}', "
                                "which the rotation folds; check that the checkpoint is complete")
        self._gains: dict[str, torch.Tensor] = {}
        # a tied head stays the embedding only if the final norm folds into it as the identity
        self.untied = self.tied and FINAL_NORM in names and not bool((self._gain(FINAL_NORM) == 1).all())
        self._keys = names + ([HEAD] if self.untied and HEAD not in names else [])
        if self.untied:
            self._recipes[HEAD] = Recipe(Op.READ, EMBED, FINAL_NORM)
        if mode == "hadamard":
            self.q = Rotation.hadamard(self.hidden, seed, f"the hidden size of {src.description}")
            self.r = Rotation.hadamard(self.head_dim, derived_seed(seed, "per-head"), f"the head_dim of {src.description}")
        else:
            self.q = Rotation.random(self.hidden, seed)
            self.r = Rotation.random(self.head_dim, derived_seed(seed, "per-head"))
        self.online = self._online_transform(names) if online else None
        self._ops = {
            Op.COPY: self._copy, Op.ONES: self._ones, Op.EMBED: self._embed, Op.READ: self._read,
            Op.READ_V: self._read_v, Op.READ_QKV: self._read_qkv, Op.BIAS_V: self._bias_v, Op.WRITE: self._write,
            Op.WRITE_O: self._write_o, Op.BIAS_WRITE: self._bias_write,
        }

    # ---- the Source interface -----------------------------------------------------------
    @cached_property
    def config(self):
        cfg = copy.deepcopy(self.src.config)
        if self.untied:
            cfg.tie_word_embeddings = False
        return cfg

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, name: str):
        return self.src.info(self._recipe_of(name).source)

    def get(self, name: str) -> torch.Tensor:
        recipe = self._recipe_of(name)
        dtype, _ = self.src.info(recipe.source)
        if recipe.op not in (Op.COPY, Op.ONES) and not dtype.is_floating_point:
            raise QConvertError(f"'{recipe.source}' of {self.description} is stored as {dtype}; rotation needs "
                                "floating-point weights: start from the original checkpoint")
        return self._ops[recipe.op](recipe, dtype)

    def iter_rows(self, name: str):
        """Row slices of the rotated tensor; the embedding and the head are rotated slice by
        slice (each output row depends on its own input row only), the rest is whole."""
        recipe = self._recipe_of(name)
        if recipe.op == Op.COPY:
            yield from self.src.iter_rows(name)
            return
        if recipe.op not in ROW_WISE:
            yield self.get(name)
            return
        dtype, _ = self.src.info(recipe.source)
        fn = self._row_fn(recipe)
        for part in self.src.iter_rows(recipe.source):
            yield from _slices(part, fn, dtype, budget=self.chunk_bytes)

    def load_model(self, dtype: torch.dtype = torch.float32):
        """The rotated model, whole (what ``verify`` compares a rotated OUT with)."""
        from qconvert.skeleton import model_from_tensors

        model, missing, unexpected = model_from_tensors(self.config, {k: self.get(k).to(dtype) for k in self._keys})
        if missing or unexpected:
            raise QConvertError(f"the rotated tensors of {self.description} do not fit its config "
                                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        if self.online is not None:
            from qconvert.online_hadamard import attach_all

            attach_all(model, self.online_modules(), self.online)
        return model.eval()

    def describe(self) -> dict:
        """What was done, for the report."""
        norms = sorted({r.norm for r in self._recipes.values() if r.norm})
        fused = any(r.op == Op.READ_QKV for r in self._recipes.values())  # Phi-3
        values, reads = ("qkv_proj's value", "qkv_proj") if fused else ("v_proj", "q/k/v_proj")
        return {
            "mode": self.mode,
            "seed": self.seed,
            "residual": self.q.label,
            "per_head": f"{self.r.label} on {values} rows and o_proj columns, per head",
            "head_seed": derived_seed(self.seed, "per-head"),
            "folded_norms": len(norms),
            "folded": [f"input_layernorm -> {reads}", "post_attention_layernorm -> mlp gate/up, routers, experts",
                       "model.norm -> lm_head"],
            "untied": self.untied,
            **({"online": {**self.online.describe(), "modules": self.online_modules()}} if self.online else {}),
        }

    # ---- an image-text checkpoint's parts outside the language model (qconvert.multimodal)
    def carried_rows(self, name: str):
        """A carried tensor as the rotated stream needs it: the projector's output linear rotated
        as o_proj is (Q^T W, Q^T b: the image features enter the stream rotated), the rest as it is."""
        kind = self.src.family.stream_write(name)
        if kind is None:
            return self.src.carried_rows(name)
        t = self.src.carried_get(name)
        if not t.dtype.is_floating_point:
            raise QConvertError(f"'{name}' of {self.description} is stored as {t.dtype}; rotation needs "
                                "floating-point weights: start from the original checkpoint")
        if kind == "weight" and t.shape[0] != self.hidden:
            raise QConvertError(f"'{name}' of {self.description} writes {t.shape[0]} channels, not the text "
                                f"model's hidden_size {self.hidden}; check config.json")
        return iter([(self._written if kind == "weight" else self._written_bias)(t, t.dtype)])

    # ---- the online Hadamard transform before down_proj (``--rotate hadamard+online``)
    def _online_transform(self, names: list[str]):
        from qconvert.online_hadamard import OnlineHadamard

        if self.mode != "hadamard":
            raise QConvertError("the online transform goes with --rotate hadamard+online only, not with random rotations")
        if any(".experts." in n or "block_sparse_moe" in n or "shared_expert" in n for n in names):
            raise OnlineUnsupported(f"--rotate hadamard+online handles dense MLPs; {self.description} is a mixture "
                                    "of experts: use --rotate hadamard")
        width = int(getattr(self.src.config, "intermediate_size", 0) or 0)
        return OnlineHadamard(width, f"the intermediate_size of {self.description}")

    def online_modules(self) -> list[str]:
        """The linears whose input the run time transforms (every dense MLP's down_proj)."""
        if self.online is None:
            return []
        return [n[: -len(".weight")] for n in self._keys if n.endswith(".mlp.down_proj.weight")]

    # ---- the transforms -----------------------------------------------------------------
    def _recipe_of(self, name: str) -> Recipe:
        return self._recipes[name]  # a KeyError, as any Source gives for a name it lacks

    def _gain(self, norm: str) -> torch.Tensor:
        """An RMSNorm weight g (float64 [H]), kept: 2 per layer, H values each."""
        if norm not in self._gains:
            g = self.src.get(norm).to(torch.float64)
            if tuple(g.shape) != (self.hidden,):
                raise QConvertError(f"'{norm}' of {self.description} has shape {tuple(g.shape)}, not ({self.hidden},) "
                                    "as the config's hidden_size says")
            self._gains[norm] = g
        return self._gains[norm]

    def _row_fn(self, recipe: Recipe) -> Callable[[torch.Tensor], torch.Tensor]:
        if recipe.op == Op.EMBED:
            return self.q.right
        g = self._gain(recipe.norm)
        return lambda rows: self.q.right(rows * g)

    def _per_head_left(self, y: torch.Tensor) -> torch.Tensor:
        """``R^T y_h`` for each block y_h of head_dim rows of float64 ``y [k * d, C]``: ``(y_h^T R)^T``."""
        d = self.head_dim
        if y.shape[0] % d:
            raise QConvertError(f"a tensor of {self.description} has {y.shape[0]} rows, not whole heads of "
                                f"head_dim {d}; check config.json")
        blocks = y.reshape(-1, d, y.shape[-1]).transpose(1, 2)  # [k, C, d]
        return self.r.right(blocks).transpose(1, 2).reshape(y.shape)

    def _copy(self, recipe, dtype):
        return self.src.get(recipe.source)

    def _ones(self, recipe, dtype):
        _, shape = self.src.info(recipe.source)
        return torch.ones(shape, dtype=dtype)

    def _embed(self, recipe, dtype):
        return _map_rows(self.src.get(recipe.source), self.q.right, dtype, budget=self.chunk_bytes)

    def _read(self, recipe, dtype):
        return self._read_rows(self.src.get(recipe.source), recipe, dtype)

    def _read_rows(self, w, recipe, dtype):
        return _map_rows(w, self._row_fn(recipe), dtype, budget=self.chunk_bytes)

    def _read_v(self, recipe, dtype):
        return self._read_v_rows(self.src.get(recipe.source), recipe, dtype)

    def _read_v_rows(self, w, recipe, dtype):
        g = self._gain(recipe.norm)
        fn = lambda rows: self._per_head_left(self.q.right(rows * g))  # noqa: E731
        return _map_rows(w, fn, dtype, align=self.head_dim, budget=self.chunk_bytes)

    def _read_qkv(self, recipe, dtype):
        # Phi-3's qkv_proj: the rows of q_proj, k_proj and v_proj one after the other
        w = self.src.get(recipe.source)
        qk = (self.heads + self.kv_heads) * self.head_dim
        if w.shape[0] != qk + self.kv_heads * self.head_dim:
            raise QConvertError(f"'{recipe.source}' of {self.description} has {w.shape[0]} rows, not the "
                                f"{qk + self.kv_heads * self.head_dim} of its config's q, k and v heads; check config.json")
        return torch.cat([self._read_rows(w[:qk], recipe, dtype), self._read_v_rows(w[qk:], recipe, dtype)])

    def _bias_v(self, recipe, dtype):
        b = self.src.get(recipe.source)
        return self.r.right(b.to(torch.float64).reshape(-1, self.head_dim)).reshape(b.shape).to(dtype)

    def _write(self, recipe, dtype):
        w = self.src.get(recipe.source)
        if self.online is not None and recipe.source.endswith(".mlp.down_proj.weight"):
            w = self._online_fold(w, recipe.source)  # W Q_d in float64: one rounding, at the end
        return self._written(w, dtype)

    def _written(self, w, dtype):
        # Q^T W = (W^T Q)^T: W's columns, as rows of W^T, slice by slice
        return _map_rows(w.t(), self.q.right, dtype, budget=self.chunk_bytes).t().contiguous()

    def _online_fold(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """``W Q_d`` (float64): the input side of down_proj rotated as the run time rotates its input."""
        if w.shape[-1] != self.online.n:
            raise QConvertError(f"'{name}' of {self.description} reads {w.shape[-1]} channels, not the config's "
                                f"intermediate_size {self.online.n}; check config.json")
        rot = Rotation(self.online.factors(), None, "online")
        return _map_rows(w, rot.right, torch.float64, budget=self.chunk_bytes)

    def _write_o(self, recipe, dtype):
        # column block h of W' = Q^T W[:, h] R; as rows of W'^T: R^T (W[:, h]^T Q)
        w = self.src.get(recipe.source)
        fn = lambda cols: self._per_head_left(self.q.right(cols))  # noqa: E731
        return _map_rows(w.t(), fn, dtype, align=self.head_dim, budget=self.chunk_bytes).t().contiguous()

    def _bias_write(self, recipe, dtype):
        return self._written_bias(self.src.get(recipe.source), dtype)

    def _written_bias(self, b, dtype):  # Q^T b
        return self.q.right(b.to(torch.float64)).to(dtype)
