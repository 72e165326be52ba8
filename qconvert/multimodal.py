"""Multimodal checkpoints whose language model qconvert quantizes (Gemma-3 4B and up, Mistral-Small-3.1,
LLaVA-1.5, Pixtral-12B, InternVL2.5/3 in transformers' format, SmolVLM / Idefics3, Qwen2-VL,
Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE).

Such a checkpoint keeps a causal language model (model type ``gemma3_text``, ``mistral``, …) under
a prefix, beside an image encoder and a projector that feed it image features.  The Qwen-VL models'
language model has a config of its own (``qwen2_5_vl_text``, …) only for its multimodal RoPE
(M-RoPE): text gives each of M-RoPE's three position sections the same position, which makes it
the plain RoPE of a Qwen2 / Qwen3 model, so qconvert reads it as one (``Family.text_as``,
``Family.text_config``) and export writes the checkpoint's own text config back.  Qwen3-VL-MoE's
reads as Qwen3-MoE, its fused experts as one linear per expert (``qconvert.moe.fused_expert_views``).  qconvert reads the
language model as the text model it is (``qconvert.source.LanguageModelSource``: the text config,
the tensors under their text-model names), so the walk, the runtime, ``eval``, ``verify`` and the
decode engine see a plain text model.  The other tensors are carried into ``OUT/multimodal/``, with the
record of how the checkpoint named things in ``qconvert.json``; ``qconvert export`` writes the
whole multimodal checkpoint again: the language model quantized, the image parts as they came, and
a ``quantization_config`` that leaves the image parts alone (docs/format.md, "Multimodal").

A rotated residual stream (``--rotate``, the presets' default) rotates the image features with it:
the projector's last linear, which writes them into the stream, is rotated as an o_proj is
(``Family.writes``; Q^T W and Q^T b); so are Qwen3-VL's DeepStack mergers, whose features are
added to the stream after its first layers.  Where that linear is not known, the stream is not rotated.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.errors import QConvertError

CARRIED_DIR = "multimodal"  # OUT's folder for the tensors outside the language model
RECORD_KEY = "multimodal"  # qconvert.json's record of the checkpoint's naming and outer config


@dataclass(frozen=True)
class Family:
    """How one multimodal model type lays out its checkpoint and transformers' modules."""

    model_type: str
    # (decoder prefix, head tensor) as checkpoints name them: transformers' own saves and the
    # published checkpoints use the first; a model saved as transformers' module tree, the second
    namings: tuple[tuple[str, str], ...]
    module_prefix: str  # where transformers' multimodal class keeps the text model's modules
    head_module: str
    carried: tuple[str, ...]  # the top-level parts outside the language model, kept as they are
    # the linears whose output joins the residual stream (the image features), as regular
    # expressions of their names: a rotated stream rotates them too; none known, no rotation
    writes: tuple[str, ...] = ()
    # the text model type qconvert reads the language model as, where its config has a type of its
    # own that differs from that model only in its (multimodal) RoPE; None: read as it is
    text_as: str | None = None
    # fields the ``text_as`` config is given beyond the source's: where the language model fixes what
    # that model's config leaves to a field (Qwen3-VL-MoE always renormalizes its top-k weights)
    text_fields: tuple[tuple[str, object], ...] = ()

    def carries(self, name: str) -> bool:
        """Whether tensor ``name`` belongs to a part kept as it is (under either naming)."""
        return any(name.startswith(p + ".") or name.startswith(f"model.{p}.") for p in self.carried)

    def stream_write(self, name: str) -> str | None:
        """The kind ("weight" or "bias") where tensor ``name`` belongs to one of ``writes``, else None."""
        for linear in self.writes:
            m = re.fullmatch(rf"(?:model\.)?{linear}\.(weight|bias)", name)
            if m:
                return m.group(1)
        return None

    def text_config(self, text):
        """The language model's config as qconvert reads it: ``text`` itself, or the ``text_as``
        model's config with the same fields and M-RoPE's sections dropped (one-dimensional RoPE of
        the same frequencies: what M-RoPE computes for text)."""
        if self.text_as is None:
            return text
        from transformers import AutoConfig

        fields = {k: v for k, v in text.to_dict().items() if k not in TEXT_OWN_KEYS}
        rope = {k: v for k, v in (fields.get("rope_parameters") or {}).items() if k not in MROPE_KEYS}
        if rope.get("rope_type", "default") not in ("default", "mrope"):
            raise QConvertError(f"a {self.model_type} language model with RoPE type {rope['rope_type']!r}: qconvert "
                                "reads it only with its default M-RoPE; check config.json's rope_scaling")
        fields["rope_parameters"] = {**rope, "rope_type": "default"}
        return AutoConfig.for_model(self.text_as, **{**fields, **dict(self.text_fields)})


# what ``Family.text_config`` leaves out of a text config it reads as another type's; what
# ``outer_config`` takes back from the checkpoint's own text config; M-RoPE's own RoPE fields
TEXT_OWN_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path")
RESTORED_KEYS = ("model_type", "rope_parameters", "rope_scaling")
MROPE_KEYS = ("mrope_section", "mrope_interleaved", "type")
_LLAVA_NAMING = (("language_model.model.", "language_model.lm_head.weight"), ("model.language_model.", "lm_head.weight"))
_LLAVA_PARTS = ("vision_tower", "multi_modal_projector")
FAMILIES = {
    "gemma3": Family("gemma3", _LLAVA_NAMING, "model.language_model.", "lm_head", _LLAVA_PARTS),
    # their projector ends in linear_2, which writes the image features into the stream
    "mistral3": Family("mistral3", _LLAVA_NAMING, "model.language_model.", "lm_head", _LLAVA_PARTS,
                       (r"multi_modal_projector\.linear_2",)),
    "llava": Family("llava", _LLAVA_NAMING, "model.language_model.", "lm_head", _LLAVA_PARTS,  # LLaVA-1.5, Pixtral-12B
                    (r"multi_modal_projector\.linear_2",)),
    # InternVL2.5 / InternVL3 as transformers names them (the "-hf" checkpoints): a Qwen2 (Llama) language model
    "internvl": Family("internvl", _LLAVA_NAMING, "model.language_model.", "lm_head", _LLAVA_PARTS,
                       (r"multi_modal_projector\.linear_2",)),
}
# SmolVLM / SmolVLM2 and Idefics3: a Llama under model.text_model.; the connector's one linear writes
# the image features into the stream
for _t in ("smolvlm", "idefics3"):
    FAMILIES[_t] = Family(_t, (("model.text_model.", "lm_head.weight"),), "model.text_model.", "lm_head",
                          ("vision_model", "connector"), (r"connector\.modality_projection\.proj",))
# Qwen2-VL and Qwen2.5-VL: published checkpoints keep the language model under model., the image
# encoder under visual. (transformers writes them so too); its merger's last linear writes the image
# features into the stream
_QWEN_NAMING = (("model.", "lm_head.weight"), ("model.language_model.", "lm_head.weight"))
for _t in ("qwen2_vl", "qwen2_5_vl"):
    FAMILIES[_t] = Family(_t, _QWEN_NAMING, "model.language_model.", "lm_head", ("visual",),
                          (r"visual\.merger\.mlp\.2",), text_as="qwen2")
# Qwen3-VL: saved as transformers' module tree; its DeepStack mergers add image features to the stream
# after the first layers, as the merger writes them before the first
_QWEN3_VL_WRITES = (r"visual\.merger\.linear_fc2", r"visual\.deepstack_merger_list\.\d+\.linear_fc2")
FAMILIES["qwen3_vl"] = Family("qwen3_vl", (("model.language_model.", "lm_head.weight"),), "model.language_model.",
                              "lm_head", ("visual",), _QWEN3_VL_WRITES, text_as="qwen3")
# Qwen3-VL-MoE: the same around a Qwen3-MoE language model that always renormalizes its top-k routing
# weights; its checkpoints keep the experts fused (qconvert.moe.fused_expert_views)
FAMILIES["qwen3_vl_moe"] = Family("qwen3_vl_moe", (("model.language_model.", "lm_head.weight"),), "model.language_model.",
                                  "lm_head", ("visual",), _QWEN3_VL_WRITES, text_as="qwen3_moe",
                                  text_fields=(("norm_topk_prob", True),))


def transformers_cannot_load(model_type: str | None) -> str | None:
    """Why transformers cannot load an export of this model type (None: it can).  A Qwen3-VL-MoE
    export keeps one compressed linear per expert, as llm-compressor writes them and vLLM reads them;
    transformers maps its checkpoints' experts only from the fused tensors."""
    if model_type != "qwen3_vl_moe":
        return None
    import transformers

    return (f"transformers {transformers.__version__} reads Qwen3-VL-MoE's experts only as fused tensors, and the "
            "export keeps one compressed linear per expert (as vLLM reads them)")


def family_of(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", None))


def view(src):
    """The ``qconvert.source.LanguageModelSource`` under ``src`` (a rotation would wrap it as
    ``src.src``), or None."""
    while src is not None and not isinstance(getattr(src, "family", None), Family):
        src = getattr(src, "src", None)
    return src


def write_carried(src, partial: Path, shard_bytes: int, metadata: dict) -> dict | None:
    """Write the tensors outside the language model into ``partial/multimodal/`` as ``src`` gives
    them (as they are; a rotated source rotates the projector's output linear); return the record
    for qconvert.json (None for a text model).  A resumed run writes them again."""
    from qconvert.formats.safetensors_io import ShardedWriter

    mm = view(src)
    if mm is None:
        return None
    d = Path(partial) / CARRIED_DIR
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    writer = ShardedWriter(d, shard_bytes, metadata)
    for name in mm.carried:
        dtype, shape = mm.src.info(name)
        writer.add_rows(name, dtype, tuple(shape), src.carried_rows(name))
    writer.close()
    rotated = [n for n in mm.carried if src is not mm and mm.family.stream_write(n)]
    return {**mm.record(), **({"rotated": rotated} if rotated else {})}


def read_record(out: Path) -> dict | None:
    """OUT's multimodal record (qconvert.json), None for a text model's OUT."""
    try:
        report = json.loads((Path(out) / "qconvert.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    rec = report.get(RECORD_KEY) if isinstance(report, dict) else None
    if rec is None:
        return None
    if not isinstance(rec, dict) or rec.get("model_type") not in FAMILIES or not (Path(out) / CARRIED_DIR).is_dir():
        raise QConvertError(f"{out}: qconvert.json's multimodal record or {CARRIED_DIR}/ is damaged; re-run qconvert quantize")
    return rec


class Renamer:
    """OUT's text-model names as the multimodal checkpoint and transformers' multimodal class name them."""

    def __init__(self, rec: dict):
        self.family = FAMILIES[rec["model_type"]]
        self.prefix, self.head = rec["text_prefix"], rec["head"]

    def tensor(self, name: str) -> str:
        if name.startswith("lm_head."):
            return self.head.removesuffix("weight") + name.removeprefix("lm_head.")
        if not name.startswith("model."):
            raise QConvertError(f"tensor {name!r} is outside the language model's names")
        return self.prefix + name.removeprefix("model.")

    def module(self, name: str) -> str:
        if name == "lm_head":
            return self.family.head_module
        return self.family.module_prefix + name.removeprefix("model.")

    def ignored_parts(self) -> list[str]:
        """compressed-tensors ``ignore`` patterns for the carried parts, whatever prefix an engine gives them."""
        return [f"re:.*{p}.*" for p in self.family.carried]


def outer_config(rec: dict, text_cfg: dict) -> dict:
    """The multimodal config.json around ``text_cfg`` (the OUT's text config as exported)."""
    cfg = dict(rec["config"])
    text = {k: v for k, v in text_cfg.items() if k not in ("architectures", "quantization_config", "_name_or_path")}
    own = rec.get("text_config")
    if own is not None:  # read as another type's (Family.text_as): the checkpoint's own text config, OUT's values
        text = {**own, **{k: v for k, v in text.items() if k in own and k not in RESTORED_KEYS}}
    cfg["text_config"] = text
    if "tie_word_embeddings" in text:
        cfg["tie_word_embeddings"] = text["tie_word_embeddings"]
    return cfg


def check_carried(out: Path) -> str | None:
    """What is wrong with OUT's carried parts (the record against ``multimodal/``), None if nothing."""
    from qconvert.formats.safetensors_io import ShardedReader

    rec = read_record(out)
    if rec is None:
        return None
    names = ShardedReader(Path(out) / CARRIED_DIR).keys()
    if len(names) != rec.get("tensors"):
        return f"{CARRIED_DIR}/ holds {len(names)} tensors, qconvert.json records {rec.get('tensors')}"
    return None


def compare_carried(out: Path, src) -> str | None:
    """Whether OUT's carried parts are what ``src`` gives (the source's, bit for bit; rotated as
    OUT records where ``src`` is the source rotated so): None, or the first that is not."""
    from qconvert.formats.safetensors_io import ShardedReader

    mm, rec = view(src), read_record(out)
    if mm is None or rec is None:
        return None if mm is rec else f"{src.description} is {'' if mm else 'not '}a multimodal checkpoint, OUT is " \
                                      f"{'' if rec else 'not '}one: is it the source OUT was made from?"
    reader = ShardedReader(Path(out) / CARRIED_DIR)
    stored = set(reader.keys())
    for name in mm.carried:
        if name not in stored:
            return f"{CARRIED_DIR}/ lacks the source's '{name}'"
        parts = list(src.carried_rows(name))
        got, want = reader.get(name), parts[0] if len(parts) == 1 else torch.cat(parts)
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            return f"{CARRIED_DIR}/{name} differs from the source's"
    return None
