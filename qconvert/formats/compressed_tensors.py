"""Export a native OUT as a compressed-tensors checkpoint (docs/export.md).

compressed-tensors (the format of llm-compressor, read by transformers and vLLM) keeps *what*
is quantized in ``config.json`` (a scheme: targets, weights, input activations, and the storage
``format``) and stores each quantized linear ``P`` as a few tensors (``P.weight_packed`` /
``P.weight``, ``P.weight_scale``, ``P.weight_shape``).  What a qconvert layout maps to, and the
exact tensors, is its layout's business (``Layout.export_scheme`` / ``export_tensors`` in
qconvert/layouts/); this module checks that every quantized layer maps onto one scheme, and
writes the checkpoint atomically, shard by shard.

compressed-tensors has no padded group: every K must be a multiple of the group size g (per
tensor-parallel rank, for vLLM).  qconvert pads K up to a multiple of g instead, so where g does
not divide a K the export writes groups of g_e = gcd(g, every K) and repeats each of qconvert's
group scales (and zero points) g / g_e times: the same weights, exactly (``export_group_size``).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qconvert import __version__, multimodal
from qconvert.errors import QConvertError
from qconvert.formats.native import EVAL_FILE, EXPORT_MARKER, read_quant_config, saved_evals
from qconvert.formats.safetensors_io import FLOAT_DTYPES, ShardedReader, ShardedWriter
from qconvert.fsutil import atomic_directory, check_not_mount_point, check_writable_parent, parse_size
from qconvert.moe import is_moe, is_router
from qconvert.source import TOKENIZER_FILES

FORMAT = "compressed-tensors"
MARKER = EXPORT_MARKER  # provenance and the file list (qconvert push); also what lets --force replace an export
ORIGIN_KEYS = ("source", "source_kind", "source_info", "scheme", "rotation", "rotation_skipped", "calibration",
               "float_path", "multimodal")  # of OUT's qconvert.json
SCALE_DTYPES = {name: FLOAT_DTYPES[name] for name in ("float32", "float16", "bfloat16")}  # in --scale-dtype's order
MIN_SPLIT_GROUP = 32  # the smallest group any vLLM int4 kernel takes (Marlin: 32, 64, 128; qconvert/serving.py)


def exportable() -> str:
    """What exports to what, from the layout registry (for help texts and errors)."""
    from qconvert.layouts import available_layouts, get_layout

    return ", ".join(f"{n} as {get_layout(n).export_note}" for n in available_layouts() if get_layout(n).export_note)


@dataclass
class ExportReport:
    out: Path
    preset: str
    group_size: int | None
    scale_dtype: str
    layers: int
    ignored: list[str]
    max_scale_rel_error: float  # largest |stored - exact| / exact over all exported scales
    serving: list = field(default_factory=list)  # qconvert.serving.Finding per layer, with --target
    split_from: int | None = None  # OUT's group size, where each of its groups was written as several

    def to_dict(self):
        return {"out": str(self.out), "format": FORMAT, "preset": self.preset, "group_size": self.group_size,
                **({"split_from_group_size": self.split_from} if self.split_from else {}),
                "scale_dtype": self.scale_dtype, "layers": self.layers, "ignore": self.ignored,
                "max_scale_rel_error": self.max_scale_rel_error, "serving": [asdict(f) for f in self.serving]}


@dataclass
class _Plan:
    cfg: dict
    config: object  # the transformers config
    qc: dict
    scheme: dict  # the compressed-tensors scheme every quantized layer maps onto (Layout.export_scheme)
    layers: list  # qconvert.runtime.StoredLayer
    ignore: list[str]
    scale_dtype: torch.dtype
    split: int = 1  # each of OUT's groups is written as this many groups with its scale

    @property
    def group_size(self) -> int | None:
        return self.scheme["weights"].get("group_size")

    @property
    def out_group_size(self) -> int | None:
        """OUT's own group size (``group_size`` is the one written)."""
        return self.group_size and self.group_size * self.split


def _check_dest(dest: Path, force: bool, out: Path) -> None:
    if dest.resolve() == out.resolve() or out.resolve() in dest.resolve().parents:
        raise QConvertError(f"-o {dest} is {out} or inside it; write the export to another directory")
    check_not_mount_point(dest)
    if dest.exists() and not force:
        raise QConvertError(f"{dest} already exists; pass --force to overwrite it, or choose another -o")
    if dest.exists() and not dest.is_dir():
        raise QConvertError(f"{dest} exists and is not a directory; remove it or choose another -o")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MARKER).is_file():
        raise QConvertError(f"{dest} is not empty and is not a qconvert export; --force only replaces those: choose another -o")
    check_writable_parent(dest)


def _transformers_linears(config) -> set[str]:
    """Names of the nn.Linear modules of transformers' own model of this config (no weights)."""
    from transformers import AutoModelForCausalLM

    from qconvert.skeleton import meta_parameters

    with meta_parameters():
        model = AutoModelForCausalLM.from_config(config)
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _default_scale_dtype(cfg: dict, reader: ShardedReader, quantized: set[str]) -> torch.dtype:
    """The dtype transformers loads the model in, which is the one compressed-tensors gives
    ``weight_scale``: the config's dtype, else that of the stored unquantized tensors."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if name in SCALE_DTYPES:
        return SCALE_DTYPES[name]
    for t in reader.keys():
        dt = reader.info(t).dtype
        if t.rpartition(".")[0] not in quantized and dt in SCALE_DTYPES.values():
            return dt
    return torch.float32


def _layer_schemes(out: Path, qc: dict, config, reader, tensor_parallel: int = 1) -> tuple[list, dict, int]:
    """Every quantized layer (complete on disk), the one compressed-tensors scheme they share (with
    the group size to write), and how many groups each of OUT's groups becomes."""
    from qconvert.layouts import NotExportable
    from qconvert.runtime import stored_layer
    from qconvert.skeleton import build_skeleton

    params = dict(build_skeleton(config).named_parameters())
    layers, schemes, refused = [], {}, {}
    for name, layout in qc["modules"].items():
        layer = stored_layer(name, layout, qc, params, reader)
        problems = layer.problems(reader)
        if problems:
            raise QConvertError(f"{out}: {problems[0]}; the output is incomplete, re-run quantize")
        try:
            schemes[name] = layer.layout.export_scheme(layer.n, layer.k, **layer.params)
        except NotExportable as e:
            refused.setdefault(name, e)
        layers.append(layer)
    if refused:  # how many, so that no one excludes the first named and expects the rest to go
        name, e = next(iter(refused.items()))
        many = "" if len(refused) == 1 else f"{len(refused)} of its {len(layers)} quantized linears cannot be exported; first, " \
            if len(refused) < len(layers) else f"none of its {len(layers)} quantized linears can be exported; first, "
        raise QConvertError(f"{out} (scheme {qc.get('scheme')!r}): {many}layer {name}: {e}. Exportable layouts: "
                            f"{exportable()}")
    presets = sorted({sch["preset"] for sch in schemes.values()})
    if len(presets) > 1:
        raise QConvertError(f"{out} mixes {' and '.join(presets)} layers; a {FORMAT} export takes one scheme: "
                            "re-quantize with one")
    first = next(iter(schemes.values()))
    if any(sch != first for sch in schemes.values()):
        groups = sorted({sch["weights"].get("group_size") or 0 for sch in schemes.values()})
        if len(groups) > 1:
            raise QConvertError(f"this OUT has layers of different group sizes {groups}; a {FORMAT} scheme has one: "
                                "re-quantize with one --group-size")
        raise QConvertError(f"{out}: its layers map onto different {FORMAT} schemes; re-quantize with one scheme")
    g = first["weights"].get("group_size")
    if not g:
        return layers, first, 1
    g_e = export_group_size(qc, layers, g, tensor_parallel)
    weights = {**first["weights"], "group_size": g_e}
    return layers, {**first, "weights": weights}, g // g_e


def split_group_size(layers: list, g: int, tensor_parallel: int = 1) -> int | None:
    """The group size to write for OUT's group size ``g`` at ``tensor_parallel`` ranks: ``g`` when it
    divides every K (per rank: a row-parallel linear's K is split that many ways), else
    gcd(g, every K), which divides ``g``, so each of OUT's groups is written as g / g_e groups of
    one scale (the same weights); None when that is below MIN_SPLIT_GROUP, a size no vLLM int4
    kernel takes."""
    from qconvert.serving import ROW_PARALLEL

    ks = [layer.k // tensor_parallel if layer.name.rsplit(".", 1)[-1] in ROW_PARALLEL and
          layer.k % tensor_parallel == 0 else layer.k for layer in layers]
    g_e = math.gcd(g, *ks)
    return g_e if g_e == g or g_e >= MIN_SPLIT_GROUP else None


def export_group_size(qc: dict, layers: list, g: int, tensor_parallel: int = 1) -> int:
    """``split_group_size``, refused when there is none.  At a tensor-parallel size that has none,
    the groups are sized for one rank, and the serving check refuses that size, naming those
    that work (``serving_check``)."""
    g_e = split_group_size(layers, g, tensor_parallel)
    if g_e is not None:
        return g_e
    if tensor_parallel > 1:
        return export_group_size(qc, layers, g)
    ks = [layer.k for layer in layers]
    layer = next(layer for layer in layers if layer.k % g)
    fit = math.gcd(*ks) & -math.gcd(*ks)  # the largest power of two dividing every K
    fit = min(fit, 1 << (g.bit_length() - 1))
    raise QConvertError(
        f"layer {layer.name} has K = {layer.k} input features, not a multiple of the group size g = {g}: "
        f"qconvert pads the last group, {FORMAT} cannot (it requires K % g == 0), and no group of "
        f"{MIN_SPLIT_GROUP} or more (the smallest vLLM's int4 kernels take) divides every K, so g cannot be "
        f"split either (gcd(g, every K) = {math.gcd(g, *ks)}). Re-quantize with a group size that divides "
        f"every K, e.g. `qconvert quantize SOURCE --scheme {qc.get('scheme')} --group-size {fit} -o OUT`"
        + (f" (transformers takes it; vLLM does not serve groups below {MIN_SPLIT_GROUP})" if fit < MIN_SPLIT_GROUP
           else "")
    )


def plan(out: Path, scale_dtype: str | None = None, tensor_parallel: int = 1) -> _Plan:
    """Check everything that could refuse the export, before anything is written; groups are
    sized for ``tensor_parallel`` ranks (``export_group_size``)."""
    from qconvert.runtime import model_config

    cfg, qc = read_quant_config(out)
    if not qc["modules"]:
        raise QConvertError(f"{out} has no quantized layers; there is nothing to export in {FORMAT}")
    config = model_config(out, cfg)
    reader = ShardedReader(out)
    layers, scheme, split = _layer_schemes(out, qc, config, reader, tensor_parallel)
    # after the layout check: re-quantizing with --rotate hadamard helps only an exportable layout
    if qc.get("online_rotation"):
        # vLLM's compressed-tensors transforms: type "hadamard" runs its own power-of-two kernel
        # (hadacore) and ignores the stored matrix, the dense types refuse tensor parallelism, and
        # neither composes with the W4A4 / int4-activation schemes that need the transform
        raise QConvertError(f"{out} rotates down_proj's input at run time (--rotate hadamard+online), which "
                            f"{FORMAT} cannot carry for vLLM; quantize with --rotate hadamard (offline only) to export")
    linears, routers = _moe_linears(config, set(qc["modules"])) if is_moe(config) else (_transformers_linears(config), set())
    alien = [layer.name for layer in layers if layer.name not in linears]
    if alien:
        raise QConvertError(
            f"layer {alien[0]} is not an nn.Linear of transformers' own {cfg.get('model_type')} model, so a "
            f"{FORMAT} scheme targeting Linear cannot reach it; re-quantize without it (--exclude)"
        )
    if scale_dtype is None or scale_dtype == "auto":
        sdt = _default_scale_dtype(cfg, reader, set(qc["modules"]))
    elif scale_dtype in SCALE_DTYPES:
        sdt = SCALE_DTYPES[scale_dtype]
    else:
        raise QConvertError(f"scale dtype {scale_dtype!r}: choose auto, {', '.join(SCALE_DTYPES)}")
    ignore = sorted((linears | routers) - set(qc["modules"]))
    return _Plan(cfg, config, qc, scheme, layers, ignore, sdt, split)


def _moe_linears(config, quantized: set[str]) -> tuple[set[str], set[str]]:
    """A mixture-of-experts model's linears as the checkpoint names them, one per expert projection
    (transformers fuses them into 3-D parameters, which compressed-tensors fills from these names
    as it decompresses; vLLM's loader reads them by name into its fused experts), and its routers,
    which ``ignore`` must name because vLLM builds them as linears that the Linear target reaches.
    Refused: a block with some experts quantized and others not (vLLM's fused experts take one
    scheme)."""
    from qconvert.skeleton import build_skeleton

    skeleton = build_skeleton(config)  # the checkpoint's names (qconvert.moe), which vLLM uses too
    routers = {n for n, _ in skeleton.named_modules() if is_router(n)}  # transformers' top-k routers: no Linear
    names = {n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)} - routers
    experts = {n for n in names if ".experts." in n}
    for block in {n.partition(".experts.")[0] for n in experts}:
        mine = {n for n in experts if n.startswith(block + ".experts.")}
        if mine & quantized and mine - quantized:
            raise QConvertError(
                f"{block}: {len(mine - quantized)} of its {len(mine)} expert linears are kept in full precision "
                f"(e.g. {sorted(mine - quantized)[0]}); vLLM's fused experts take one scheme for all of them. "
                "Re-quantize with every expert of a block quantized, or none")
    return names, routers


def quantization_config(scheme: dict, ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json for one scheme (``Layout.export_scheme``)."""
    group = {"targets": ["Linear"], "weights": scheme["weights"], "input_activations": scheme["input_activations"],
             "output_activations": None, "format": scheme["format"]}
    return {
        "quant_method": FORMAT,
        "format": scheme["format"],
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def architectures(cfg: dict) -> list[str]:
    """The model class engines instantiate: the source's own, else transformers' causal-LM class
    of the model type (a GGUF source records none, and vLLM would then guess a headless model)."""
    if cfg.get("architectures"):
        return list(cfg["architectures"])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.get("model_type"))
    if cls is None:
        raise QConvertError(f"config.json names no architecture and transformers knows no causal LM for model type "
                            f"{cfg.get('model_type')!r}; add \"architectures\" to the source's config.json")
    return [cls]


def serving_check(out: Path, target: str, tensor_parallel: int = 1, p: "_Plan | None" = None) -> list:
    """What vLLM (``target``: vllm[:cpu|:sm80|:sm89|:sm90]) would do with each layer of OUT's
    export at ``tensor_parallel`` ranks (qconvert/serving.py); refuses what it would refuse."""
    from qconvert import serving

    device = serving.parse_target(target)
    p = p or plan(Path(out), tensor_parallel=tensor_parallel)
    findings = serving.check_model(p.layers, p.scheme, p.config, device, tensor_parallel)

    def scheme_at(tp: int) -> dict | None:  # what an export for tp ranks would write, None if nothing
        if not p.out_group_size:
            return p.scheme
        g_e = split_group_size(p.layers, p.out_group_size, tp)
        return None if g_e is None else {**p.scheme, "weights": {**p.scheme["weights"], "group_size": g_e}}

    serving.refuse_errors(findings, p.layers, p.scheme, p.config, device, tensor_parallel, scheme_at)
    return findings


def export(out: str | Path, dest: str | Path, force: bool = False, scale_dtype: str | None = None,
           max_shard_size: str | int = "2GB", target: str | None = None, tensor_parallel: int = 1) -> ExportReport:
    """Write the native OUT as a compressed-tensors checkpoint in ``dest`` (atomically).

    ``scale_dtype``: "auto" (default: the model's dtype, which compressed-tensors gives
    ``weight_scale`` when transformers loads the model), or float32 / float16 / bfloat16.
    ``target`` (e.g. "vllm:sm90") checks, before writing, that the engine would serve every layer
    at ``tensor_parallel`` ranks, and refuses with the fix when it would not.
    """
    out, dest = Path(out), Path(dest)
    _check_dest(dest, force, out)
    p = plan(out, scale_dtype, tensor_parallel if target else 1)
    findings = serving_check(out, target, tensor_parallel, p) if target else []
    shard_bytes = parse_size(max_shard_size)
    mm = multimodal.read_record(out)
    renamer = multimodal.Renamer(mm) if mm else None
    with atomic_directory(dest, replace_marker=MARKER) as tmp:
        worst = _write_tensors(tmp, out, p, shard_bytes, renamer)
        cfg = dict(p.cfg)
        cfg.pop("_name_or_path", None)  # where transformers last read the model: a local path, of no use to a reader
        cfg["architectures"] = architectures(cfg)
        ignore = p.ignore
        if renamer is not None:  # the whole multimodal checkpoint again, its image parts left alone
            cfg = multimodal.outer_config(mm, cfg)
            ignore = [renamer.module(n) for n in p.ignore] + renamer.ignored_parts()
        cfg["quantization_config"] = quantization_config(p.scheme, ignore)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for fname in TOKENIZER_FILES:  # and generation_config.json
            if (out / fname).is_file():
                shutil.copyfile(out / fname, tmp / fname)
        report = ExportReport(dest, p.scheme["preset"], p.group_size, str(p.scale_dtype).removeprefix("torch."),
                              len(p.layers), p.ignore, worst, findings,
                              p.out_group_size if p.split > 1 else None)
        marker = {"producer": f"qconvert {__version__}", "from": str(out.resolve()), "scheme": p.qc.get("scheme"),
                  **report.to_dict(), **({"target": target, "tensor_parallel": tensor_parallel} if target else {}),
                  **_origin(out, p.qc),
                  "files": {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return report


def _origin(out: Path, qc: dict) -> dict:
    """What the export's model card says of where it comes from (qconvert.hub.export_card): the
    source, scheme, rotation and calibration records of OUT's qconvert.json, its solver and excluded
    patterns, and the
    perplexities ``qconvert eval`` saved in OUT."""

    try:
        report = json.loads((out / "qconvert.json").read_text())
    except (OSError, json.JSONDecodeError):
        report = {}
    origin = {k: report[k] for k in ORIGIN_KEYS if isinstance(report, dict) and k in report}
    origin["base"] = (qc.get("config") or {}).get("base")
    origin["exclude"] = list(qc.get("exclude") or [])  # OUT's patterns kept in full precision (the card's command)
    return {"origin": origin, "eval": saved_evals(out / EVAL_FILE)}


def _write_tensors(tmp: Path, out: Path, p: _Plan, shard_bytes: int, renamer=None) -> float:
    """Every tensor into ``tmp``'s shards, the quantized layers as their layouts export them;
    returns the largest relative rounding of an exported scale.  With ``renamer`` (a multimodal
    OUT) the language model's tensors take the checkpoint's names and the carried parts follow."""
    reader = ShardedReader(out)
    named = renamer.tensor if renamer is not None else (lambda n: n)
    writer = ShardedWriter(tmp, shard_bytes, {"producer": f"qconvert {__version__}"})
    first = {layer.tensor_names()[0]: layer for layer in p.layers}  # a layer is written where its first tensor was
    taken = {t for layer in p.layers for t in layer.tensor_names()}
    worst = 0.0
    for name in reader.keys():
        if name in first:
            layer = first[name]
            try:
                tensors, rel = layer.layout.export_tensors(layer.tensors(reader), layer.n, layer.k, p.scale_dtype,
                                                           **layer.params)
            except QConvertError as e:
                raise QConvertError(f"layer {layer.name}: {e}") from None
            for per_group in ("weight_scale", "weight_zero_point") if p.split > 1 else ():
                if per_group in tensors:  # each of OUT's groups as p.split groups of its scale (and zero
                    # point: packed along N, so a column is a group); the pad-only ones dropped
                    tensors[per_group] = tensors[per_group].repeat_interleave(p.split, dim=1)[
                        :, : layer.k // p.group_size].contiguous()
            for suffix, t in tensors.items():
                writer.add(named(f"{layer.name}.{suffix}"), t)
            worst = max(worst, rel)
        elif name not in taken:
            writer.add_rows(named(name), reader.info(name).dtype, reader.info(name).shape, reader.iter_rows(name))
    if renamer is not None:
        carried = ShardedReader(out / multimodal.CARRIED_DIR)
        for name in carried.keys():
            writer.add_rows(name, carried.info(name).dtype, carried.info(name).shape, carried.iter_rows(name))
    writer.close()
    return worst
