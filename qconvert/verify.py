"""``qconvert verify``: is OUT intact, and does it still compute what its source computes?

Structure (no model run): the manifest's sha256 and size of every file; no file missing or
unaccounted for; every shard's safetensors header; every tensor with the dtype and shape
docs/format.md declares for its layout, given the model config; the int32 overflow bound
recomputed from the stored weights; config, index and report agreeing.

Numerics (against the source): per quantized linear, the SNR of its output against the
source layer on the source model's own activations; over the sequence, the KL divergence
and top-1 agreement of next-token distributions.  Sample text is the user's file, or text
the source model writes itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qconvert.errors import QConvertError
from qconvert.formats.native import FORMAT_NAME, FORMAT_VERSION, MANIFEST, read_quant_config, sha256_file

RESULT_FILES = ("verify.json", "eval.json", "bench.json")  # written into OUT after quantize
VERIFY_FILE = "verify.json"


@dataclass
class VerifyReport:
    out: str
    failures: list[str] = field(default_factory=list)
    checked_files: int = 0
    checked_tensors: int = 0
    against: str | None = None
    sample_tokens: int = 0
    layers: list[dict] = field(default_factory=list)  # {"name", "snr_db"}
    min_snr_db: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


def _fail(rep: VerifyReport, msg: str) -> None:
    rep.failures.append(msg)


def check_files(out: Path, rep: VerifyReport) -> None:
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except FileNotFoundError:
        return _fail(rep, f"{MANIFEST} is missing")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        return _fail(rep, f"{MANIFEST} is malformed ({e})")
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        _fail(rep, f"{MANIFEST} declares format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
                   f"not {FORMAT_NAME} {FORMAT_VERSION}")
    if set(manifest) != {"format", "format_version", "files"}:
        _fail(rep, f"{MANIFEST} has unexpected keys {sorted(set(manifest) - {'format', 'format_version', 'files'})}")
    for rel, entry in sorted(files.items()):
        p = out / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            _fail(rep, f"{MANIFEST} names a path outside OUT: {rel!r}")
            continue
        if not p.is_file():
            _fail(rep, f"{rel} is listed in the manifest but missing")
            continue
        rep.checked_files += 1
        if not isinstance(entry, dict) or p.stat().st_size != entry.get("bytes"):
            _fail(rep, f"{rel}: size {p.stat().st_size} differs from the manifest")
        elif sha256_file(p) != entry.get("sha256"):
            _fail(rep, f"{rel}: sha256 differs from the manifest (the file is corrupt)")
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel not in files and rel != MANIFEST and rel not in RESULT_FILES:
            _fail(rep, f"{rel} is not in the manifest")


def _expect(rep, reader, name, dtype, shape) -> torch.Tensor | None:
    if name not in reader.where:
        _fail(rep, f"tensor {name} is missing")
        return None
    info = reader.info(name)
    if info.dtype != dtype or tuple(info.shape) != tuple(shape):
        _fail(rep, f"tensor {name} is {info.dtype} {list(info.shape)}, the format declares {dtype} {list(shape)}")
        return None
    rep.checked_tensors += 1
    return reader.get(name)


def check_tensors(out: Path, rep: VerifyReport):
    """Returns (config, qc) when the structure holds, else None (failures recorded)."""
    from qconvert.formats.safetensors_io import ShardedReader
    from qconvert.runtime import LAYOUTS, model_config
    from qconvert.skeleton import build_skeleton

    cfg, qc = read_quant_config(out)
    config = model_config(out, cfg)
    reader = ShardedReader(out)
    skeleton = build_skeleton(config)
    params = dict(skeleton.named_parameters())
    modules = qc.get("modules")
    g = (qc.get("config") or {}).get("group_size")
    grouped = isinstance(modules, dict) and any(not lay.startswith(("quik-", "fp8-", "illm-")) for lay in modules.values())
    if not isinstance(modules, dict) or (grouped and not (isinstance(g, int) and g > 0)):
        _fail(rep, "config.json: quantization_config lacks 'modules' or a group size")
        return None
    taken = set()
    for mod, layout in modules.items():
        if layout not in LAYOUTS:
            _fail(rep, f"{mod}: unknown layout {layout!r}")
            continue
        w = params.get(f"{mod}.weight")
        if w is None:
            _fail(rep, f"{mod} is not a linear layer of this model's config")
            continue
        n, k = w.shape
        if layout in ("fp4-fp8", "fp8-fp8"):
            taken |= _check_fp_layer(rep, reader, mod, layout, n, k, g)
        elif layout.startswith("quik-"):
            taken |= _check_quik_layer(rep, reader, mod, layout, n, k)
        elif layout.startswith("illm-"):
            taken |= _check_illm_layer(rep, reader, mod, layout, n, k)
        else:
            taken |= _check_int_layer(rep, reader, mod, layout, n, k, g)
        if f"{mod}.bias" in params:  # kept in the source's dtype: only its presence and shape are declared
            bias = f"{mod}.bias"
            if bias not in reader.where:
                _fail(rep, f"tensor {bias} is missing")
            elif tuple(reader.info(bias).shape) != (n,):
                _fail(rep, f"tensor {bias} has shape {list(reader.info(bias).shape)}, the config implies {[n]}")
            else:
                rep.checked_tensors += 1
            taken.add(bias)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, p in params.items():
        if name in taken or name.rsplit(".", 1)[0] in modules:
            continue
        if tied and name == "lm_head.weight":
            continue
        if name not in reader.where:
            _fail(rep, f"tensor {name} is missing")
        elif tuple(reader.info(name).shape) != tuple(p.shape):
            _fail(rep, f"tensor {name} has shape {list(reader.info(name).shape)}, the config implies {list(p.shape)}")
        else:
            rep.checked_tensors += 1
        taken.add(name)
    extra = sorted(set(reader.keys()) - taken)
    if extra:
        _fail(rep, f"tensor {extra[0]} does not belong to the model ({len(extra)} such)")
    try:
        report = json.loads((out / "qconvert.json").read_text())
        names = [r["name"] for r in report["layers"]]
        if sorted(names) != sorted(modules):
            _fail(rep, "qconvert.json and config.json list different quantized layers")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        _fail(rep, f"qconvert.json is missing or malformed ({e})")
    return None if rep.failures else (config, qc)


def _check_int_layer(rep, reader, mod: str, layout: str, n: int, k: int, g: int) -> set[str]:
    """Tensors of an int4 layer (w4a8-is, w4a8-fs, w4a16); returns the tensor names it owns."""
    from qconvert.formats.packing import unpack_int4
    from qconvert.methods.integer_scale import INT32_MAX, group_abs_sums, overflow_bound
    from qconvert.runtime import LAYOUTS

    kp = -(-k // g) * g
    groups = kp // g
    q = _expect(rep, reader, f"{mod}.qweight", torch.uint8, (n, kp // 2))
    shape = _expect(rep, reader, f"{mod}.shape", torch.int64, (2,))
    if shape is not None and shape.tolist() != [n, k]:
        _fail(rep, f"{mod}.shape is {shape.tolist()}, the config implies {[n, k]}")
    if layout == "w4a8-is":
        s_hat = _expect(rep, reader, f"{mod}.iscale", torch.int32, (n, groups))
        c = _expect(rep, reader, f"{mod}.cscale", torch.float32, (n,))
        a = _expect(rep, reader, f"{mod}.alpha_log2", torch.int32, (1,))
        if a is not None and not 0 <= int(a[0]) <= 30:
            _fail(rep, f"{mod}.alpha_log2 is {int(a[0])}, outside 0..30")
        if c is not None and not (torch.isfinite(c).all() and (c > 0).all()):
            _fail(rep, f"{mod}.cscale holds values that are not finite and positive")
        if s_hat is not None and int(s_hat.min()) < 1:
            _fail(rep, f"{mod}.iscale holds values below 1")
        elif s_hat is not None and q is not None:
            q8 = unpack_int4(q)
            if (q8[:, k:] != 0).any():
                _fail(rep, f"{mod}.qweight has non-zero padding columns")
            bound = int(overflow_bound(s_hat, group_abs_sums(q8, g)).max())
            if bound > INT32_MAX:
                _fail(rep, f"{mod}: the stored integer scales can overflow int32 (bound {bound})")
    else:
        s = _expect(rep, reader, f"{mod}.scales", torch.float16, (n, groups))
        if s is not None and not torch.isfinite(s).all():
            _fail(rep, f"{mod}.scales holds NaN or Inf")
    return {f"{mod}.{x}" for x in LAYOUTS[layout].SUFFIXES[layout]}


def _check_fp_layer(rep, reader, mod: str, layout: str, n: int, k: int, g: int) -> set[str]:
    """Tensors of a ZeroQuant-FP layer (fp4-fp8, fp8-fp8, docs/format.md); returns the names it owns."""
    from qconvert.formats.fp4 import unpack_fp4
    from qconvert.methods.zeroquant_fp import E_MAX, E_MIN, FP8_K_MULTIPLE
    from qconvert.runtime import layout_suffixes

    shape = _expect(rep, reader, f"{mod}.shape", torch.int64, (2,))
    if shape is not None and shape.tolist() != [n, k]:
        _fail(rep, f"{mod}.shape is {shape.tolist()}, the config implies {[n, k]}")
    if layout == "fp4-fp8":
        kp = -(-k // g) * g
        q = _expect(rep, reader, f"{mod}.qweight", torch.uint8, (n, kp // 2))
        e = _expect(rep, reader, f"{mod}.sexp", torch.int8, (n, kp // g))
        c = _expect(rep, reader, f"{mod}.cscale", torch.float32, (n,))
        if q is not None and (unpack_fp4(q)[:, k:] != 0).any():
            _fail(rep, f"{mod}.qweight has non-zero padding columns")
        if e is not None and e.numel() and not (E_MIN <= int(e.min()) and int(e.max()) <= E_MAX):
            _fail(rep, f"{mod}.sexp holds exponents outside {E_MIN}..{E_MAX}")
    else:
        kp = -(-k // FP8_K_MULTIPLE) * FP8_K_MULTIPLE
        q = _expect(rep, reader, f"{mod}.qweight", torch.float8_e4m3fn, (n, kp))
        c = _expect(rep, reader, f"{mod}.wscale", torch.float32, (n,))
        if q is not None and (torch.isnan(q.float()).any() or (q.view(torch.uint8)[:, k:] != 0).any()):
            _fail(rep, f"{mod}.qweight holds NaN codes or non-zero padding columns")
    if c is not None and not (torch.isfinite(c).all() and (c > 0).all()):
        _fail(rep, f"{mod}: the per-channel scales hold values that are not finite and positive")
    present = {s for s in ("lorc_u", "lorc_v") if f"{mod}.{s}" in reader.where}
    if present:
        rank = reader.info(f"{mod}.lorc_u").shape[1] if "lorc_u" in present else -1
        u = _expect(rep, reader, f"{mod}.lorc_u", torch.float16, (n, rank))
        v = _expect(rep, reader, f"{mod}.lorc_v", torch.float16, (rank, k))
        for name, t in (("lorc_u", u), ("lorc_v", v)):
            if t is not None and not torch.isfinite(t).all():
                _fail(rep, f"{mod}.{name} holds NaN or Inf")
    return {f"{mod}.{x}" for x in layout_suffixes(layout, present)}


def _check_quik_layer(rep, reader, mod: str, layout: str, n: int, k: int) -> set[str]:
    """Tensors of a QUIK layer (quik-w4a4, quik-w8a8, docs/format.md); returns the names it owns."""
    from qconvert.formats.packing import unpack_int4
    from qconvert.runtime import LAYOUTS
    from qconvert_kernels.quik.reference import padded_base

    shape = _expect(rep, reader, f"{mod}.shape", torch.int64, (2,))
    if shape is not None and shape.tolist() != [n, k]:
        _fail(rep, f"{mod}.shape is {shape.tolist()}, the config implies {[n, k]}")
    n_out = reader.info(f"{mod}.outlier_idx").shape[0] if f"{mod}.outlier_idx" in reader.where else 0
    idx = _expect(rep, reader, f"{mod}.outlier_idx", torch.int32, (n_out,))
    _expect(rep, reader, f"{mod}.outlier_weight", torch.float16, (n, n_out))
    kbp = padded_base(k - n_out)
    four = layout == "quik-w4a4"
    q = _expect(rep, reader, f"{mod}.qweight", torch.uint8 if four else torch.int8, (n, kbp // 2 if four else kbp))
    s = _expect(rep, reader, f"{mod}.wscale", torch.float32, (n,))
    r = _expect(rep, reader, f"{mod}.wsum", torch.int32, (n,))
    if idx is not None and n_out and (int(idx.min()) < 0 or int(idx.max()) >= k or len(torch.unique(idx)) != n_out):
        _fail(rep, f"{mod}.outlier_idx must hold {n_out} distinct channels in [0, {k})")
    if s is not None and not (torch.isfinite(s).all() and (s > 0).all()):
        _fail(rep, f"{mod}.wscale holds values that are not finite and positive")
    if q is not None:
        q8 = unpack_int4(q) if four else q
        if (q8[:, k - n_out:] != 0).any():
            _fail(rep, f"{mod}.qweight has non-zero padding columns")
        elif r is not None and not torch.equal(q8.to(torch.int32).sum(1, dtype=torch.int32), r):
            _fail(rep, f"{mod}.wsum is not the row sum of qweight (the zero-point term would be wrong)")
    return {f"{mod}.{x}" for x in LAYOUTS[layout].SUFFIXES[layout]}


def _check_illm_layer(rep, reader, mod: str, layout: str, n: int, k: int) -> set[str]:
    """Tensors of an I-LLM layer (illm-w8a8, illm-w4a8, illm-w4a4, docs/format.md)."""
    from qconvert.runtime import LAYOUTS

    shape = _expect(rep, reader, f"{mod}.shape", torch.int64, (2,))
    if shape is not None and shape.tolist() != [n, k]:
        _fail(rep, f"{mod}.shape is {shape.tolist()}, the config implies {[n, k]}")
    four = layout.startswith("illm-w4")
    _expect(rep, reader, f"{mod}.qweight", torch.uint8 if four else torch.int8, (n, (k + 1) // 2) if four else (n, k))
    wm = _expect(rep, reader, f"{mod}.wm", torch.int32, (n,))
    _expect(rep, reader, f"{mod}.wk", torch.int32, (n,))
    sm = _expect(rep, reader, f"{mod}.smooth", torch.float32, (k,))
    _expect(rep, reader, f"{mod}.out_smooth", torch.float32, (n,))
    if wm is not None and ((wm < 0) | (wm >= 1 << 16)).any():
        _fail(rep, f"{mod}.wm holds mantissas outside [0, 2^16)")
    if sm is not None and not (torch.isfinite(sm).all() and (sm > 0).all()):
        _fail(rep, f"{mod}.smooth holds values that are not finite and positive")
    return {f"{mod}.{x}" for x in LAYOUTS[layout].SUFFIXES[layout]}


def _sample_ids(ref, tokenizer, data_file, n_tokens: int) -> torch.Tensor:
    if data_file is not None:
        from qconvert.calib import _read_local

        ids = tokenizer(_read_local(Path(data_file)), return_tensors="pt").input_ids[:, :n_tokens]
        if ids.shape[1] < 2:
            raise QConvertError(f"{data_file} holds fewer than 2 tokens; give a longer sample")
        return ids
    start = ref.config.bos_token_id if ref.config.bos_token_id is not None else 0
    torch.manual_seed(0)
    return ref.generate(torch.tensor([[start]]), do_sample=True, top_k=50, max_new_tokens=n_tokens - 1,
                        min_new_tokens=n_tokens - 1, pad_token_id=start)


@torch.inference_mode()
def compare(out: Path, against: str, rep: VerifyReport, data_file=None, n_tokens: int = 128) -> None:
    from torch import nn

    from qconvert.runtime import QUANTIZED_MODULES, load
    from qconvert.source import resolve_source

    from qconvert.source import Source

    src = against if isinstance(against, Source) else resolve_source(against)
    ref = src.load_model(torch.float32)
    model = load(out, dtype=torch.float32)
    tok = src.load_tokenizer()
    if tok is None and data_file is not None:
        raise QConvertError(f"{against} has no tokenizer to read {data_file}; verify without --data-file")
    ids = _sample_ids(ref, tok, data_file, n_tokens)
    rep.against, rep.sample_tokens = getattr(against, "description", str(against)), int(ids.shape[1])
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED_MODULES)}
    inputs, hooks = {}, []
    for name, mod in ref.named_modules():
        if name in qmods and isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(lambda m, a, y, name=name: inputs.__setitem__(name, (a[0], y))))
    ref_logits = ref(ids).logits[0].float()
    for h in hooks:
        h.remove()
    for name, (x, y) in inputs.items():
        err = (qmods[name](x).float() - y.float()).square().sum()
        snr = 10 * math.log10(float(y.float().square().sum()) / max(float(err), 1e-30))
        rep.layers.append({"name": name, "snr_db": round(snr, 2)})
    q_logits = model(ids).logits[0].float()
    logp, logq = ref_logits.log_softmax(-1), q_logits.log_softmax(-1)
    rep.kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    rep.top1_agreement = float((ref_logits.argmax(-1) == q_logits.argmax(-1)).float().mean())
    rep.min_snr_db = min((r["snr_db"] for r in rep.layers), default=None)


def verify(out, against: str | None = None, data_file=None, n_tokens: int = 128, compare_source: bool = True,
           min_snr_db: float = 5.0, min_top1: float = 0.3, save: bool = True) -> VerifyReport:
    """Check OUT; never raises for a damaged OUT (failures are in the report)."""
    out = Path(out)
    rep = VerifyReport(out=str(out))
    if not out.is_dir():
        raise QConvertError(f"{out} is not a directory; pass a qconvert output directory")
    check_files(out, rep)
    try:
        structure = check_tensors(out, rep)
    except QConvertError as e:
        _fail(rep, str(e))
        structure = None
    except Exception as e:  # a verifier reports whatever breaks the reading as a failure, never crashes
        _fail(rep, f"OUT cannot be read as a model ({type(e).__name__}: {e})")
        structure = None
    if structure is not None and compare_source:
        if against is None:
            try:
                against = json.loads((out / "qconvert.json").read_text())["source"].split(" (")[0]
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                against = None
        if against is not None:
            compare(out, against, rep, data_file, n_tokens)
            low = [r for r in rep.layers if r["snr_db"] < min_snr_db]
            if low:
                _fail(rep, f"{len(low)} layers below {min_snr_db} dB SNR, worst {low[0]['name']} ({min(r['snr_db'] for r in low)} dB)")
            if rep.top1_agreement is not None and rep.top1_agreement < min_top1:
                _fail(rep, f"top-1 agreement {rep.top1_agreement:.3f} is below {min_top1}")
    if save and rep.ok:
        (out / VERIFY_FILE).write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    return rep
