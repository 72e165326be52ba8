"""Export a native OUT as a compressed-tensors ``pack-quantized`` checkpoint (docs/export.md).

compressed-tensors (the format of llm-compressor, read by transformers and vLLM) keeps *what*
is quantized in ``config.json`` (a scheme: targets, weights, input activations) and stores each
quantized linear ``P`` as three tensors:

    P.weight_packed  int32  [N, ceil(K / 8)]  eight int4 values per word along the input
                                              dimension, value k in bits 4(k % 8)..4(k % 8)+3
                                              of word k // 8 (low bits first), each stored as
                                              the unsigned nibble q + 8 (q in [-8, 7]); the
                                              word holds the 32 bits as two's-complement int32
    P.weight_scale   float  [N, G]            the float group scale: W[n, k] ~= q[n, k] * scale[n, k // g]
    P.weight_shape   int64  [2]               the true [N, K]

What maps (one compressed-tensors preset per qconvert layout):

    w4a8-is  -> W4A8   scale[n, j] = iscale[n, j] * cscale[n] / 2^alpha_log2  (exact in float64,
                                                                               rounded once)
    w4a8-fs  -> W4A8   scale = scales (fp16, exact in float32)
    w4a16    -> W4A16  scale = scales

compressed-tensors has no padded groups: every K must be a multiple of the group size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert import __version__
from qconvert.errors import QConvertError
from qconvert.formats.native import read_quant_config
from qconvert.formats.packing import unpack_int4
from qconvert.formats.safetensors_io import ShardedReader, ShardedWriter

FORMAT = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
MARKER = "qconvert_export.json"  # provenance; also what lets --force replace an earlier export

# qconvert layout -> (compressed-tensors preset, tensors of the native layout)
PRESETS = {
    "w4a8-is": ("W4A8", ("qweight", "shape", "iscale", "cscale", "alpha_log2")),
    "w4a8-fs": ("W4A8", ("qweight", "shape", "scales")),
    "w4a16": ("W4A16", ("qweight", "shape", "scales")),
}
EXPORTABLE = "w4a8-is and w4a8-fs (as W4A8), w4a16 (as W4A16)"
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pack_int4_words(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> int32 [N, ceil(K / 8)], compressed-tensors' int4 packing.

    Value k of a row sits in word k // 8 at bits 4 (k % 8) .. 4 (k % 8) + 3 as the unsigned
    nibble q + 8; a last, partly filled word has zero bits above the row's end.  A word whose
    top nibble is >= 8 reads as a negative int32 (the same 32 bits).
    """
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"pack_int4_words expects a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4_words: values outside [-8, 7]")
    n, k = q.shape
    u = q.to(torch.int64) + 8
    u = torch.nn.functional.pad(u, (0, -k % 8))  # padding nibbles are 0, as compressed-tensors writes them
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (u.reshape(n, -1, 8) << shifts).sum(-1)  # in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4_words(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``pack_int4_words``: int32 [N, W] -> int8 [N, k] in [-8, 7]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int4_words expects int32, got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (packed.to(torch.int64)[..., None] >> shifts) & 0xF  # arithmetic shift; the mask keeps 4 bits
    return (nibbles.flatten(-2)[..., :k] - 8).to(torch.int8)


def float_scales(layout: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The exact float group scales [N, G] of a native layer, in float64.

    w4a8-is: iscale * cscale / 2^alpha_log2 (iscale < 2^31 and cscale, a float32, are exact
    in float64; their product has at most 55 significant bits, so float64 rounds it at most
    once, by 2^-53 relative; the power of two is exact).  Float layouts: the fp16 scales.
    """
    if layout == "w4a8-is":
        a = int(t["alpha_log2"].reshape(-1)[0])
        return t["iscale"].double() * t["cscale"].double()[:, None] / float(2**a)
    return t["scales"].double()


@dataclass
class ExportReport:
    out: Path
    preset: str
    group_size: int
    scale_dtype: str
    layers: int
    ignored: list[str]
    max_scale_rel_error: float  # largest |stored - exact| / exact over all group scales

    def to_dict(self):
        return {"out": str(self.out), "format": FORMAT, "preset": self.preset, "group_size": self.group_size,
                "scale_dtype": self.scale_dtype, "layers": self.layers, "ignore": self.ignored,
                "max_scale_rel_error": self.max_scale_rel_error}


@dataclass
class _Plan:
    cfg: dict
    qc: dict
    preset: str
    group_size: int
    ignore: list[str]
    scale_dtype: torch.dtype


def _check_dest(dest: Path, force: bool, out: Path) -> None:
    if dest.resolve() == out.resolve() or out.resolve() in dest.resolve().parents:
        raise QConvertError(f"-o {dest} is {out} or inside it; write the export to another directory")
    if dest.exists() and not force:
        raise QConvertError(f"{dest} already exists; pass --force to overwrite it, or choose another -o")
    if dest.exists() and not dest.is_dir():
        raise QConvertError(f"{dest} exists and is not a directory; remove it or choose another -o")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MARKER).is_file():
        raise QConvertError(f"{dest} is not empty and is not a qconvert export; --force only replaces those: choose another -o")
    parent = dest.resolve().parent
    if not parent.is_dir():
        raise QConvertError(f"the parent directory {parent} of {dest} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise QConvertError(f"cannot write into {parent}; choose a writable -o")


def _transformers_linears(out: Path, cfg: dict) -> set[str]:
    """Names of the nn.Linear modules of transformers' own model of this config (no weights)."""
    from transformers import AutoModelForCausalLM

    from qconvert.runtime import model_config
    from qconvert.skeleton import meta_parameters

    with meta_parameters():
        model = AutoModelForCausalLM.from_config(model_config(out, cfg))
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


def plan(out: Path, scale_dtype: str | None = None) -> _Plan:
    """Check everything that could refuse the export, before anything is written."""
    cfg, qc = read_quant_config(out)
    modules: dict[str, str] = qc["modules"]
    if not modules:
        raise QConvertError(f"{out} has no quantized layers; there is nothing to export in {FORMAT}")
    bad = sorted({lay for lay in modules.values() if lay not in PRESETS})
    if bad:
        first = next(n for n, lay in modules.items() if lay == bad[0])
        raise QConvertError(
            f"{out} (scheme {qc.get('scheme')!r}) has layout {bad[0]!r} (e.g. {first}), which {FORMAT} cannot "
            f"express: this release has no {FORMAT} equivalent for it. Exportable layouts: {EXPORTABLE}"
        )
    presets = {PRESETS[lay][0] for lay in modules.values()}
    if len(presets) > 1:
        raise QConvertError(f"{out} mixes W4A8 and W4A16 layers; a {FORMAT} export takes one scheme: re-quantize with one")
    reader = ShardedReader(out)
    group_sizes, ks = {}, {}
    for name, layout in modules.items():
        missing = [s for s in PRESETS[layout][1] if f"{name}.{s}" not in reader.where]
        if missing:
            raise QConvertError(f"{out}: tensor '{name}.{missing[0]}' is missing; the output is incomplete, re-run quantize")
        ks[name] = int(reader.get(f"{name}.shape")[1])
        kp = reader.info(f"{name}.qweight").shape[1] * 2
        group_sizes[name] = kp // reader.info(f"{name}.{'iscale' if layout == 'w4a8-is' else 'scales'}").shape[1]
    for name, k in ks.items():
        g = group_sizes[name]
        if k % g:
            fit = math.gcd(*ks.values()) & -math.gcd(*ks.values())  # the largest power of two dividing every K
            fit = min(fit, 1 << (g.bit_length() - 1))
            raise QConvertError(
                f"layer {name} has K = {k} input features, not a multiple of the group size g = {g}: qconvert pads "
                f"the last group, {FORMAT} cannot (it requires K % g == 0). Re-quantize with a group size that "
                f"divides every K, e.g. `qconvert quantize SOURCE --scheme {qc.get('scheme')} --group-size {fit} -o OUT`"
            )
    if len(set(group_sizes.values())) > 1:
        raise QConvertError(f"{out} has layers of different group sizes {sorted(set(group_sizes.values()))}; "
                            f"a {FORMAT} scheme has one: re-quantize with one --group-size")
    linears = _transformers_linears(out, cfg)
    alien = [n for n in modules if n not in linears]
    if alien:
        raise QConvertError(
            f"layer {alien[0]} is not an nn.Linear of transformers' own {cfg.get('model_type')} model (mixture-of-"
            f"experts experts are fused there), so a {FORMAT} scheme targeting Linear cannot reach it; "
            "this export supports dense models only"
        )
    if scale_dtype is None or scale_dtype == "auto":
        sdt = _default_scale_dtype(cfg, reader, set(modules))
    elif scale_dtype in SCALE_DTYPES:
        sdt = SCALE_DTYPES[scale_dtype]
    else:
        raise QConvertError(f"scale dtype {scale_dtype!r}: choose auto, {', '.join(SCALE_DTYPES)}")
    ignore = sorted(linears - set(modules))
    return _Plan(cfg, qc, presets.pop(), next(iter(group_sizes.values())), ignore, sdt)


def quantization_config(preset: str, group_size: int, ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json for ``preset`` (W4A8 or W4A16)."""
    scheme = {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": group_size, "dynamic": False},
        "input_activations": None,
        "output_activations": None,
        "format": PACK_FORMAT,
    }
    if preset == "W4A8":
        scheme["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                       "dynamic": True}
    return {
        "quant_method": FORMAT,
        "format": PACK_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def export(out: str | Path, dest: str | Path, force: bool = False, scale_dtype: str | None = None,
           max_shard_size: str | int = "2GB") -> ExportReport:
    """Write the native OUT as a compressed-tensors checkpoint in ``dest`` (atomically).

    ``scale_dtype``: "auto" (default: the model's dtype, which compressed-tensors gives
    ``weight_scale`` when transformers loads the model), or float32 / float16 / bfloat16.
    """
    from qconvert.pipeline import parse_size
    from qconvert.source import TOKENIZER_FILES

    out, dest = Path(out), Path(dest)
    _check_dest(dest, force, out)
    p = plan(out, scale_dtype)
    shard_bytes = parse_size(max_shard_size)
    modules: dict[str, str] = p.qc["modules"]
    reader = ShardedReader(out)
    tmp = Path(tempfile.mkdtemp(dir=dest.resolve().parent, prefix=f".{dest.name}.tmp-"))
    try:
        writer = ShardedWriter(tmp, shard_bytes, {"producer": f"qconvert {__version__}"})
        taken = {f"{m}.{s}" for m, lay in modules.items() for s in PRESETS[lay][1]}
        worst = 0.0
        for name in reader.keys():
            module = name.rpartition(".")[0]
            if name in taken:
                if name == f"{module}.qweight":
                    worst = max(worst, _write_layer(writer, reader, module, modules[module], p.scale_dtype))
                continue
            writer.add_rows(name, reader.info(name).dtype, reader.info(name).shape, reader.iter_rows(name))
        writer.close()
        cfg = dict(p.cfg)
        cfg["quantization_config"] = quantization_config(p.preset, p.group_size, p.ignore)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for fname in TOKENIZER_FILES:  # and generation_config.json
            if (out / fname).is_file():
                shutil.copyfile(out / fname, tmp / fname)
        report = ExportReport(dest, p.preset, p.group_size, str(p.scale_dtype).removeprefix("torch."),
                              len(modules), p.ignore, worst)
        marker = {"producer": f"qconvert {__version__}", "from": str(out.resolve()), "scheme": p.qc.get("scheme"),
                  **report.to_dict()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if dest.exists():  # --force, checked above to be an earlier export or empty
            old = Path(tempfile.mkdtemp(dir=dest.resolve().parent, prefix=f".{dest.name}.old-"))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise QConvertError(f"writing {dest} failed ({e.strerror or e}); nothing was left behind: fix the cause "
                                "(disk space, permissions) and repeat the command") from e
        raise
    return report


def _write_layer(writer: ShardedWriter, reader: ShardedReader, module: str, layout: str, dtype: torch.dtype) -> float:
    """Write one quantized linear's weight_packed, weight_scale, weight_shape; return the
    largest relative rounding error of its stored scales."""
    t = {s: reader.get(f"{module}.{s}") for s in PRESETS[layout][1]}
    n, k = (int(v) for v in t["shape"])
    q = unpack_int4(t["qweight"])
    assert q.shape == (n, k), (module, q.shape, n, k)  # plan() checked K % g == 0: no padding
    exact = float_scales(layout, t)
    stored = exact.to(dtype)
    if not torch.isfinite(stored).all() or bool((stored == 0).any()):
        raise QConvertError(
            f"layer {module}: a group scale of {float(exact.min()):.3g}..{float(exact.max()):.3g} does not fit "
            f"{str(dtype).removeprefix('torch.')} (it would become 0 or inf); export with --scale-dtype float32"
        )
    rel = float(((stored.double() - exact).abs() / exact).max()) if exact.numel() else 0.0
    writer.add(f"{module}.weight_packed", pack_int4_words(q))
    writer.add(f"{module}.weight_scale", stored.contiguous())
    writer.add(f"{module}.weight_shape", torch.tensor([n, k], dtype=torch.int64))
    return rel
