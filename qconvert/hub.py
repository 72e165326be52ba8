"""``qconvert push``: publish a finished OUT, or a compressed-tensors export of one, to the
Hugging Face Hub, with a generated card.

The card (README.md) is built in memory from what OUT already holds: the scheme in
config.json's ``quantization_config``, the report and source record in qconvert.json, and
the results that ``eval``, ``verify`` and ``bench`` saved beside them.  An export's card comes
from its config.json and ``qconvert_export.json``, where ``qconvert export`` copied OUT's source
record and perplexities.  Nothing pushed is modified; every file goes up in one commit, so a
failed push leaves nothing half-updated.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qconvert.errors import QConvertError
from qconvert.formats.native import EVAL_FILE, EXPORT_MARKER, MANIFEST, perplexity_rows, read_quant_config, saved_evals, sha256_file
from qconvert.fsutil import public_name
from qconvert.journal import NAME as JOURNAL
from qconvert.source import HUB_ID, source_spec

CARD = "README.md"
VERIFY_FILE = "verify.json"  # written by a passing qconvert verify
# written by qconvert bench: a list of end-to-end results, or one {"device", "date", "results"}
BENCH_FILES = ("bench_results.json", "bench.json")
TEMP_SUFFIXES = (".tmp", ".temp", ".partial", ".lock", "~")
LIBRARY = "qconvert"
EXPORT_HINT = "qconvert export OUT --format compressed-tensors"


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    local: Path | None  # None: made in memory (the card; an export's record without local paths)
    size: int
    data: bytes | None = None  # what goes up when ``local`` is None
    note: str = ""  # why it is not the file as it is on disk


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


# ----------------------------------------------------------------------------- completeness


def check_complete(out: Path) -> None:
    """Refuse an OUT that a conversion has not finished, or that lost files since."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")  # qconvert.pipeline.partial_dir, without importing torch
    if partial.exists():
        raise QConvertError(
            f"{partial} exists beside {out.name}: a conversion into {out} did not finish; complete it with "
            f"`qconvert quantize ... -o {out} --resume` (or delete {partial.name} if you abandoned it), then push"
        )
    if not out.is_dir():
        raise QConvertError(f"{out} is not a directory; pass the -o directory that qconvert quantize wrote")
    if (out / JOURNAL).exists():
        raise QConvertError(f"{out} holds a conversion journal: the run did not finish; re-run qconvert quantize with --resume")
    for name in ("config.json", "qconvert.json", MANIFEST):
        if not (out / name).is_file():
            raise QConvertError(
                f"{out} is incomplete: {name} is missing; re-run `qconvert quantize SOURCE -o {out} --force`"
            )
    read_quant_config(out)  # a qconvert output of a format this version reads
    index = out / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise QConvertError(f"{index} is not a valid index ({e}); re-run qconvert quantize with --force") from e
        missing = [s for s in shards if not (out / s).is_file()]
        if missing:
            raise QConvertError(
                f"{out} is incomplete: shard {missing[0]} listed in {index.name} is missing; "
                f"re-run `qconvert quantize SOURCE -o {out} --force`"
            )
    elif not (out / "model.safetensors").is_file():
        raise QConvertError(f"{out} is incomplete: model.safetensors is missing; re-run qconvert quantize with --force")
    manifest = _read_json(out / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise QConvertError(f"{out / MANIFEST} is unreadable; run `qconvert verify {out}`, or re-quantize with --force")
    for rel, entry in sorted(files.items()):  # sizes first (cheap), then every file's sha256: what is pushed is what was made
        p = out / rel
        if not p.is_file():
            raise QConvertError(f"{out} is incomplete: {rel} is listed in {MANIFEST} but missing; re-quantize with --force")
        if isinstance(entry, dict) and entry.get("bytes") != p.stat().st_size:
            raise QConvertError(
                f"{out / rel} has {p.stat().st_size} bytes, {MANIFEST} says {entry.get('bytes')}: the file is "
                f"damaged; run `qconvert verify {out}` and re-quantize with --force"
            )
    for rel, entry in sorted(files.items()):
        if isinstance(entry, dict) and entry.get("sha256") and sha256_file(out / rel) != entry["sha256"]:
            raise QConvertError(
                f"{out / rel}: sha256 differs from {MANIFEST} (the file changed or is corrupt since it was written); "
                f"nothing was uploaded: run `qconvert verify {out}` and re-quantize with --force"
            )


def is_export(out: Path) -> bool:
    """Whether ``out`` is a directory ``qconvert export`` wrote."""
    return (Path(out) / EXPORT_MARKER).is_file()


def check_export_complete(out: Path) -> dict:
    """The marker of a finished export whose files are all there at their recorded sizes."""
    out = Path(out)
    again = f"export it again with `{EXPORT_HINT} -o {out} --force`"
    marker = _read_json(out / EXPORT_MARKER)
    cfg = _read_json(out / "config.json")
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(marker, dict) or not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        raise QConvertError(f"{out} is not a readable compressed-tensors export (config.json, {EXPORT_MARKER}); {again}")
    files = marker.get("files")
    if not isinstance(files, dict):
        raise QConvertError(f"{out} was exported by a qconvert that did not record its files, which a push checks; {again}")
    for rel, size in sorted(files.items()):
        p = out / rel
        if not p.is_file():
            raise QConvertError(f"{out} is incomplete: {rel}, which the export wrote, is missing; {again}")
        if p.stat().st_size != size:
            raise QConvertError(f"{p} has {p.stat().st_size} bytes, the export wrote {size}: the file is damaged; {again}")
    return marker


def _out_files(out: Path) -> list[UploadFile]:
    """OUT's files that belong to the model: not hidden or temporary ones (journals, editor
    and lock files, links), and not an OUT/README.md, which the card replaces."""
    files = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if not p.is_file() or p.is_symlink() or rel == CARD:
            continue
        if any(part.startswith(".") for part in rel.split("/")) or rel.endswith(TEMP_SUFFIXES):
            continue
        files.append(UploadFile(rel, p, p.stat().st_size))
    return files


def upload_files(out: Path, card: str | bytes, card_note: str = "generated card") -> list[UploadFile]:
    """What a push uploads: OUT's model files, and ``card`` as README.md (``card_note``: how the
    listing names it).  An export's ``qconvert_export.json`` and an eval.json go up without the local
    paths they record (``public_export_record``, ``public_evals``)."""
    files = _out_files(Path(out))
    public = {EVAL_FILE: _public_eval_file(Path(out))}
    if is_export(Path(out)):
        public[EXPORT_MARKER] = _in_memory(EXPORT_MARKER, public_export_record(Path(out) / EXPORT_MARKER),
                                           "local paths left out")
    files = [public.get(f.path_in_repo) or f for f in files]
    files.append(_in_memory(CARD, card.encode() if isinstance(card, str) else card, card_note))
    return files


def _in_memory(name: str, data: bytes, note: str) -> UploadFile:
    return UploadFile(name, None, len(data), data, note)


def public_evals(rows: list) -> list:
    """``qconvert eval`` rows with each target by its directory's name (rows saved before that
    rule kept the path as given)."""
    return [{**r, "target": public_name(r["target"])} if isinstance(r, dict) and isinstance(r.get("target"), str)
            else r for r in rows]


def public_export_record(path: Path) -> bytes:
    """An export's record as it goes to the Hub: the OUT and export directories and eval targets
    by name, a local source as ``path/to/NAME`` (as the card shows it, also inside the rotation
    note), a calibration file by name."""
    record = json.loads(Path(path).read_text())
    for key in ("from", "out"):
        if isinstance(record.get(key), str):
            record[key] = public_name(record[key])
    if isinstance(record.get("eval"), list):
        record["eval"] = public_evals(record["eval"])
    origin = record.get("origin")
    if isinstance(origin, dict):
        record["origin"] = _public_origin(origin)
    return (json.dumps(record, indent=2) + "\n").encode()


def _public_origin(origin: dict) -> dict:
    """OUT's source records as an export shows them (``public_export_record``, the card)."""
    origin = copy.deepcopy(origin)
    prov = _Provenance.of(origin, {})
    if isinstance(origin.get("rotation_skipped"), str):
        origin["rotation_skipped"] = prov.scrub(origin["rotation_skipped"])
    if prov.local:
        origin["source"] = prov.public_source
    calib = origin.get("calibration")
    if isinstance(calib, dict) and isinstance(calib.get("data_file"), str):
        calib["data_file"] = public_name(calib["data_file"])
    return origin


def _public_eval_file(out: Path) -> UploadFile | None:
    """OUT/eval.json with every target by name, when it holds a path."""
    path = out / EVAL_FILE
    saved = _read_json(path)
    if not isinstance(saved, list) or public_evals(saved) == saved:
        return None
    return _in_memory(EVAL_FILE, (json.dumps(public_evals(saved), indent=2) + "\n").encode(), "local paths left out")


# ----------------------------------------------------------------------------- the card


def _base_model(report: dict) -> str | None:
    info = report.get("source_info") or {}
    if info.get("base_model"):
        return info["base_model"]
    src = source_spec(report) or ""
    # an OUT from before source_info: a Hub id is recognisable, a local path is not one
    if report.get("source_kind") == "safetensors" and HUB_ID.match(src) and not Path(src).exists():
        return src
    return None


def _layouts(qc: dict) -> list:
    """The layouts of OUT's quantized linears, in order of first appearance."""
    from qconvert.layouts import get_layout

    names = list(dict.fromkeys((qc.get("modules") or {}).values()))
    return [get_layout(n) for n in names]


def _tags(qc: dict, scheme: dict, report: dict | None = None) -> list[str]:
    cfg, params = qc.get("config") or {}, scheme.get("params") or {}
    tags = ["quantized", "qconvert", qc.get("scheme") or scheme.get("name")]
    for layout in _layouts(qc):
        tags += layout.tags(cfg)
    if cfg.get("base", params.get("base")) == "gptq":
        tags.append("gptq")
    rot = (report or {}).get("rotation")
    if rot:
        tags += ["rotated", f"{rot.get('mode')}-rotation"] + (["online-hadamard"] if rot.get("online") else [])
    return [t for i, t in enumerate(tags) if t and t not in tags[:i]]


def _mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,} bytes ({n / 1e6:.1f} MB)"


def _scheme_rows(qc: dict, report: dict) -> list[tuple[str, str]]:
    cfg = qc.get("config") or {}
    rows = []
    for layout in _layouts(qc):  # what each layout says of its weights and activations, once
        rows += [r for r in layout.card_rows(cfg) if r not in rows]
    rows += _rotation_rows(report) + _multimodal_rows(report)
    rows += _solver_rows(cfg.get("base"), report.get("calibration"), report.get("float_path"))
    layouts = sorted(set((qc.get("modules") or {}).values()))
    rows.append(("quantized", f"{len(qc.get('modules') or {})} linear layers (layout {', '.join(layouts) or '-'})"))
    kept = ["embeddings", "norms"] + [e for e in qc.get("exclude") or []]
    rows.append(("full precision", ", ".join(kept)))
    rows.append(("method / format", f"{qc.get('method')} / {qc.get('format')} v{qc.get('format_version')} "
                                    f"(qconvert {qc.get('qconvert_version')})"))
    return rows


def _rotation_rows(report: dict) -> list[tuple[str, str]]:
    """How the residual stream was rotated (qconvert.json's ``rotation``), or why not."""
    rows = []
    rot = report.get("rotation")
    if rot:
        rows.append(("rotation", f"residual stream rotated before quantization ({rot.get('mode')}, seed {rot.get('seed')}), "
                                 "RMSNorm weights folded into the linears, V/O rotated per head: the same function in "
                                 "float, folded into the stored weights (no run-time cost)"
                                 + ("; lm_head untied from the embedding, as folding the final norm requires"
                                    if rot.get("untied") else "")))
        online = rot.get("online")
        if online:
            rows.append(("online rotation", f"down_proj's input is rotated at run time by a Hadamard transform of order "
                                            f"{online.get('order')} ({online.get('m')} x {online.get('p')}; qconvert's "
                                            "runtime and kernels apply it, compressed-tensors cannot carry it)"))
    if report.get("rotation_skipped"):  # the default not applied (in part: the online transform)
        rows.append(("online rotation" if rot else "rotation", report["rotation_skipped"]))
    return rows


def _multimodal_rows(report: dict) -> list[tuple[str, str]]:
    """A multimodal checkpoint's parts kept as they came (qconvert.json's ``multimodal``)."""
    rec = report.get("multimodal")
    if not isinstance(rec, dict):
        return []
    rotated = rec.get("rotated") or []
    return [("image parts", f"{rec.get('model_type')}: the language model is quantized; the image encoder and projector "
                            f"({rec.get('tensors')} tensors) are kept bit for bit as the source has them"
                            + (f", but for {', '.join(f'`{n}`' for n in rotated)}, rotated with the residual stream "
                               "(the image features enter it rotated)" if rotated else ""))]


def _solver_rows(base: str | None, calib, float_path: str | None = None) -> list[tuple[str, str]]:
    """The weight solver, the calibration data GPTQ saw, and the float path it ran on (another CPU
    or GPU rounds otherwise: docs/calibration.md, "Determinism")."""
    if base == "gptq":
        how = "GPTQ, calibrated block by block"
        if isinstance(calib, dict):
            data = {"self": "text the model wrote itself", "wikitext2": "WikiText-2", "c4": "C4"}.get(calib.get("source"))
            data = data or (Path(calib["data_file"]).name if calib.get("data_file") else str(calib.get("source", "?")))
            how += f" on {calib.get('nsamples', '?')} x {calib.get('seqlen', '?')} tokens of {data}"
            if calib.get("asym"):
                how += f", aimed at the float model's outputs (asymmetric calibration, GPTAQ, alpha {calib['asym']:g})"
        return [("solver", how)] + ([("calibrated on", float_path)] if float_path else [])
    if base == "rtn":
        return [("solver", "round-to-nearest (no calibration data)")]
    return []


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in r) + " |" for r in rows
    ]


def _run_on(row: dict) -> str:
    """Where an eval row ran: "cuda (NVIDIA H100 80GB HBM3), float16"; rows saved before ``eval --device``
    ran on the CPU in float32."""
    if not row.get("device"):
        return "cpu, float32"
    name = row.get("device_name")
    return f"{row['device']}{f' ({name})' if name else ''}, {row.get('dtype', '?')}"


def _eval_table(rows: list[dict]) -> list[str]:
    return _table(["dataset", "seqlen", "windows", "perplexity", "run on"],
                  [[r.get("dataset", "?"), r.get("seqlen", "?"), r.get("windows", "?"), f"{r['perplexity']:.3f}",
                    _run_on(r)] for r in rows])


def _eval_section(out: Path) -> list[str]:
    rows = saved_evals(out / EVAL_FILE)
    if not rows:
        return ["Perplexity: not measured yet (`qconvert eval OUT --data-file wiki.test.raw` saves it into OUT)."]
    return ["Perplexity measured by `qconvert eval` (non-overlapping windows; lower is better):", ""] + _eval_table(rows)


def _verify_section(out: Path) -> list[str]:
    rep = _read_json(out / VERIFY_FILE)
    if not isinstance(rep, dict):
        return ["Not verified yet (`qconvert verify OUT` saves a passing report into OUT)."]
    lines = [f"`qconvert verify` passed: {rep.get('checked_files', '?')} files and {rep.get('checked_tensors', '?')} "
             "tensors checked (sha256, dtypes, shapes, int32 bound)."]
    if rep.get("against"):
        rows = [["compared with", rep["against"]], ["sample tokens", rep.get("sample_tokens")]]
        if rep.get("min_snr_db") is not None:
            rows.append(["least layer output SNR", f"{rep['min_snr_db']} dB"])
        if rep.get("kl") is not None:
            rows.append(["KL divergence of next-token distributions", f"{rep['kl']:.4f}"])
        if rep.get("top1_agreement") is not None:
            rows.append(["top-1 next-token agreement", f"{rep['top1_agreement']:.3f}"])
        lines += [""] + _table(["check", "value"], rows)
    return lines


def _model_speed_rows(r: dict) -> list[list]:
    """Rows of one end-to-end result of ``qconvert bench OUT`` (qconvert.bench.out_bench)."""
    fp, q, up = r.get("original_speed") or {}, r.get("quantized") or {}, r.get("speedup") or {}
    rows = []
    if "prefill_tokens_per_s" in q:
        rows.append([f"prefill 1 x {q.get('prefill_tokens', '?')} (tokens/s)", fp.get("prefill_tokens_per_s", ""),
                     q["prefill_tokens_per_s"], f"{up['prefill']:.2f}x" if "prefill" in up else ""])
    for a, b in zip(fp.get("decode") or [{}] * len(q.get("decode") or []), q.get("decode") or []):
        s = up.get(f"decode_batch{b.get('batch')}")
        rows.append([f"decode {b.get('new_tokens', '?')} tokens, batch {b.get('batch', '?')} (tokens/s)",
                     a.get("tokens_per_s", ""), b.get("tokens_per_s", ""), f"{s:.2f}x" if s is not None else ""])
    return rows


def _bench_section(out: Path) -> list[str]:
    """Speed figures saved by ``qconvert bench``: a list of end-to-end results (OUT/bench.json),
    or one object with "device", "date" and "results"."""
    saved = None
    for name in BENCH_FILES:
        saved = _read_json(out / name)
        if saved:
            break
    entries = saved if isinstance(saved, list) else [saved] if isinstance(saved, dict) else []
    entries = [e for e in entries if isinstance(e, dict)]
    if not entries:
        return ["No speed figures: this model has not been benchmarked (`qconvert bench OUT` saves them into OUT)."]
    lines = []
    for e in entries:
        env = e.get("environment") or {}
        device, date = e.get("device") or env.get("device"), e.get("date") or env.get("date")
        runtime = e.get("runtime")
        lines += [f"Measured by `qconvert bench` on {device or 'an unrecorded device'}" + (f" ({date})" if date else "")
                  + (f", runtime `{runtime}`" if runtime else "") + ":", ""]
        if runtime == "cpu-reference":
            lines += ["These figures come from the exact CPU reference, written for exactness, not speed; "
                      "they say nothing about the GPU kernels.", ""]
        if isinstance(e.get("note"), str) and e["note"]:
            lines += [f"Note: {e['note']}.", ""]
        if "quantized" in e:
            lines += _table(["measure", "original", "quantized", "speed-up"],
                            _model_speed_rows(e))
        elif isinstance(e.get("results"), list) and all(isinstance(r, dict) for r in e["results"]):
            cols = list(dict.fromkeys(k for r in e["results"] for k in r))
            lines += _table(cols, [[r.get(c, "") for c in cols] for r in e["results"]])
        elif isinstance(e.get("results"), dict):
            lines += _table(["measure", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                                   for k, v in e["results"].items()])
        else:
            lines.append("```json\n" + json.dumps(e.get("results", e), indent=2) + "\n```")
        lines.append("")
    return lines[:-1]


@dataclass
class _Provenance:
    """Where an OUT came from, as its card tells it (from qconvert.json's source records); no
    private path is shown."""

    report: dict
    info: dict
    base: str | None
    license: str | None
    source: str
    local: bool

    @classmethod
    def of(cls, report: dict, cfg: dict) -> "_Provenance":
        info = report.get("source_info") or {}
        base = _base_model(report)
        source = str(report.get("source", "?"))
        local = not info.get("id") and not base and (Path(source).is_absolute() or os.sep in source)
        return cls(report, info, base, info.get("license") or cfg.get("license"), source, local)

    @property
    def shown(self) -> str:
        return f"a local checkpoint `{Path(self.source).name}`" if self.local else f"`{self.source}`"

    @property
    def public_source(self) -> str:
        return "path/to/" + Path(self.source).name if self.local else self.source

    def scrub(self, text: str) -> str:
        """``text`` with a local source's path as the card shows it."""
        return text.replace(self.source, self.public_source) if self.local else text

    @property
    def origin(self) -> str:
        return f"[{self.base}](https://huggingface.co/{self.base})" if self.base else self.shown[0].upper() + self.shown[1:]

    def meta(self) -> dict:
        return {**({"base_model": self.base} if self.base else {}), **({"license": self.license} if self.license else {})}

    def title(self, repo_id: str | None, name: str) -> str:
        return repo_id.split("/")[-1] if repo_id else f"{(self.base or Path(self.source).name).split('/')[-1]}-{name}"

    def source_lines(self) -> list[str]:
        if self.info.get("id"):
            return [f"Source: `{self.info['id']}` at commit `{self.info.get('revision') or '?'}`"
                    + (f"; license `{self.license}` carried over from its card" if self.license else "") + ".", ""]
        stored = f" Its weights are {self.info['format']}." if self.info.get("format") else ""
        if self.base:
            return [f"Source: {self.shown}, which packs {self.base}.{stored}", ""]
        return [f"Source: {self.shown}.{stored}", ""] if stored else []

    def size_row(self) -> list[str]:
        n = len(self.info.get("files") or {})
        return [f"source weights ({n} file{'s' if n != 1 else ''})" if n else "source weights",
                _mb(self.info.get("bytes")) if self.info.get("bytes") else "not recorded"]

    def quantize_command(self, name: str, out: str = "out/", exclude: list | None = None) -> str:
        """The command that makes OUT again; for a scheme that is not a preset (a user's TOML file),
        preceded by the file, written from what OUT records (method, parameters, excluded modules)."""
        src = self.info.get("id") or (self.public_source if self.local else source_spec(self.report) or "SOURCE")
        revision = f" --revision {self.info['revision']}" if self.info.get("id") and self.info.get("revision") else ""
        flags = "".join(f" {f}" for f in option_flags(self.report, name, exclude))
        own = _own_scheme(self.report, name, exclude)
        scheme_file = ""
        if own is not None:
            name = (re.sub(r"[^\w.-]", "_", name).strip("._") or "scheme") + ".toml"
            scheme_file = f"cat > {shlex.quote(name)} <<'EOF'\n{_scheme_toml(own)}EOF\n"
        return f"{scheme_file}qconvert quantize {shlex.quote(src)} --scheme {shlex.quote(name)}{revision}{flags} -o {out}"


def _method_defaults(method: str) -> dict:
    """The method's own parameter defaults (its config with no parameters), {} where there are none."""
    import dataclasses

    from qconvert.methods import method_class

    try:
        return dataclasses.asdict(method_class(method).config_class())
    except (QConvertError, TypeError):
        return {}


def _own_scheme(report: dict, name: str, exclude: list | None):
    """The scheme OUT was made with when ``name`` is not a preset (a user's TOML file), as OUT
    records it: its method, parameters and excluded modules, no rotation or asymmetric calibration of
    its own (those are options then); None for a preset."""
    from qconvert.schemes_registry import load_scheme

    try:
        load_scheme(name)
        return None
    except QConvertError:
        return _recorded_scheme(report, name, exclude)


def _recorded_scheme(report: dict, name: str, exclude: list | None):
    """Scheme ``name`` as OUT's report and config record it (method, parameters, excluded modules)."""
    from qconvert.schemes_registry import Scheme

    scheme = report.get("scheme") or {}
    return Scheme(name, str(scheme.get("description") or ""), str(scheme.get("method") or "?"),
                  dict(scheme.get("params") or {}), tuple(exclude or ()))


def _toml_value(v) -> str:
    """A TOML value: strings as JSON writes them without ASCII escapes (a \\u escape of an emoji's
    surrogate pair is not TOML), TOML's own inf / nan, lists of such."""
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)


def _scheme_toml(scheme) -> str:
    """A scheme file's text (schemes_registry.parse_scheme reads it back)."""
    lines = [f"name = {_toml_value(scheme.name)}"] + ([f"description = {_toml_value(scheme.description)}"] if scheme.description else [])
    lines += [f"method = {_toml_value(scheme.method)}", f"exclude = {_toml_value(list(scheme.exclude))}", "", "[params]"]
    lines += [f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else json.dumps(k)} = {_toml_value(v)}" for k, v in scheme.params.items()]
    return "\n".join(lines) + "\n"


def changed_from_preset(report: dict, name: str, exclude: list | None = None) -> list[str]:
    """The options among ``option_flags`` that change what the preset's description says of the
    tensors (its parameters, group size, solver, excluded modules)."""
    return [f for f in option_flags(report, name, exclude)
            if f.startswith(("-g ", "--param ", "--base ", "--quantize-lm-head", "--exclude "))]


def option_flags(report: dict, name: str, exclude: list | None = None) -> list[str]:
    """The quantize options that made OUT from scheme ``name``, from its report (qconvert.json) and
    its config's ``exclude``: what differs from the preset as this qconvert defines it (parameters,
    rotation, calibration, excluded modules); a data file by its name only.  For a scheme that is not
    a preset (a user's file, which the card writes out: ``_own_scheme``), what differs from that file."""
    from qconvert.calibration_text import default_shape
    from qconvert.schemes_registry import load_scheme

    try:
        preset = load_scheme(name)
    except QConvertError:
        preset = _recorded_scheme(report, name, exclude)
    q = shlex.quote
    flags = []
    params = (report.get("scheme") or {}).get("params") or {}
    if params:  # a preset key OUT's report lacks (the preset gained it later): OUT had the method's default
        params = {**{k: v for k, v in _method_defaults(preset.method).items() if k in preset.params}, **params}
    for key, value in params.items():
        if preset.params.get(key) != value:
            shown = value if isinstance(value, str) else json.dumps(value)  # TOML for numbers, booleans, lists
            flags += {"group_size": [f"-g {value}"], "base": [f"--base {q(str(value))}"]}.get(
                key, [f"--param {q(f'{key}={shown}')}"])
    if exclude is not None:
        flags += [] if "lm_head" in exclude or "lm_head" not in preset.exclude else ["--quantize-lm-head"]
        flags += [f"--exclude {q(p)}" for p in exclude if p not in preset.exclude]
    # the preset's rotation and asymmetric calibration are its defaults under GPTQ only (qconvert.pipeline)
    gptq = params.get("base") != "rtn"
    rot = report.get("rotation") or {}
    mode = (rot.get("mode", "none") + ("+online" if rot.get("online") else "")) if rot else "none"
    if mode != (preset.rotate if gptq else "none") and not report.get("rotation_skipped"):
        flags.append(f"--rotate {mode}")
    if rot.get("seed"):
        flags.append(f"--rotate-seed {rot['seed']}")
    if report.get("device", "cpu") != "cpu":
        flags.append(f"--device {report['device']}")
    calib = report.get("calibration") or {}
    if calib:
        source = calib.get("source") or "self"
        if calib.get("data_file"):
            flags.append(f"--calib {source} --data-file {q('path/to/' + Path(calib['data_file']).name)}")
        elif source != "self":
            flags.append(f"--calib {source}")
        shape = default_shape(source)
        flags += [f"--nsamples {calib['nsamples']}"] if calib.get("nsamples") not in (None, shape[0]) else []
        flags += [f"--seqlen {calib['seqlen']}"] if calib.get("seqlen") not in (None, shape[1]) else []
        flags += [f"--seed {calib['seed']}"] if calib.get("seed") else []
        flags += [f"--calib-dtype {calib['dtype']}"] if calib.get("dtype", "float32") != "float32" else []
        if float(calib.get("asym") or 0) != (float(preset.asym_calib) if gptq else 0.0):
            flags.append(f"--asym-calib {float(calib.get('asym') or 0):g}")
    return flags


def _export_line(out: Path) -> str:
    """What the card says of a compressed-tensors copy: how to make it, or, where ``qconvert export``
    would refuse this OUT (a layout with no compressed-tensors form, an online rotation), why not."""
    from qconvert.formats.compressed_tensors import plan

    try:
        scheme = plan(out).scheme
    except QConvertError as e:
        why = str(e).split(". Exportable layouts:")[0]
        if why.startswith(str(out)):  # the export's errors open with OUT's local path
            why = "this model" + why[len(str(out)):]
        return f"transformers and vLLM do not read this format, and `{EXPORT_HINT}` cannot make a copy they read: {why}."
    zero_points = not scheme["weights"].get("symmetric", True)
    note = f" ({scheme['preset']}; transformers cannot load its zero points yet)" if zero_points else ""
    return (f"transformers and vLLM do not read this format: for {'vLLM' if zero_points else 'them'}, export a "
            f"compressed-tensors copy with `{EXPORT_HINT}`{note}.")


def model_card(out: str | os.PathLike, repo_id: str | None = None) -> str:
    """The README.md for OUT: YAML front matter for the Hub, then what was done and measured.

    Pure: reads OUT's config.json, qconvert.json, saved results and (for what it says of an export)
    the safetensors headers ``qconvert export`` checks; writes nothing.
    """
    import yaml

    out = Path(out)
    cfg, qc = read_quant_config(out)
    report = _read_json(out / "qconvert.json")
    if not isinstance(report, dict):
        raise QConvertError(f"{out} has no readable qconvert.json; re-run qconvert quantize with --force")
    scheme = report.get("scheme") or {}
    name = qc.get("scheme") or scheme.get("name", "?")
    prov = _Provenance.of(report, cfg)
    meta = {**prov.meta(), "library_name": LIBRARY, "pipeline_tag": "text-generation",
            "tags": _tags(qc, scheme, report)}
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    changed = changed_from_preset(report, name, qc.get("exclude"))
    what = (f", changed by `{' '.join(changed)}` (the preset: {scheme['description']})." if changed and scheme.get("description")
            else f": {scheme['description']}." if scheme.get("description") else ".")
    lines = [f"# {prov.title(repo_id, name)}", "",
             f"{prov.origin} quantized by qconvert with the scheme **{name}**{what}", ""] + prov.source_lines()

    shown_report = {**report, **({"rotation_skipped": prov.scrub(report["rotation_skipped"])}
                                 if isinstance(report.get("rotation_skipped"), str) else {})}
    lines += ["## Scheme", ""] + _table(["part", "how"], _scheme_rows(qc, shown_report)) + [""]

    totals = report.get("totals") or {}
    mine = _out_files(out)
    weights = sum(f.size for f in mine if f.path_in_repo.endswith(".safetensors"))
    size_rows = [prov.size_row(), ["these weights (safetensors)", _mb(weights)],
                 ["all files here but this card", _mb(sum(f.size for f in mine))]]
    if totals.get("quantized_bytes"):
        ratio = totals["quantized_fp16_bytes"] / max(totals["quantized_bytes"], 1)
        size_rows.append(["quantized linears: fp16 -> packed",
                          f"{totals['quantized_fp16_bytes']:,} -> {totals['quantized_bytes']:,} bytes ({ratio:.2f}x smaller)"])
    if totals.get("min_headroom_bits") is not None:
        size_rows.append(["least int32 headroom of a group sum", f"{totals['min_headroom_bits']} bits"])
    lines += ["## Size", ""] + _table(["what", "size"], size_rows) + [""]

    lines += ["## Accuracy", ""] + _eval_section(out) + [""] + _verify_section(out) + [""]
    lines += ["## Speed", ""] + _bench_section(out) + [""]

    lines += _native_use_lines(qc, repo_id, report.get("tokenizer", True)) + ["", _export_line(out), ""]

    lines += ["## Reproduce", "", "```bash", prov.quantize_command(name, exclude=qc.get("exclude")), "```", "",
              "`qconvert.json` records the per-layer report and the sha256 of every source weight file; "
              "`manifest.json` the sha256 of every file here.", ""]
    return "---\n" + front + "---\n\n" + "\n".join(lines)


def _native_use_lines(qc: dict, repo_id: str | None, tokenizer: bool = True) -> list[str]:
    """The card's "Use" section for an OUT: load it with qconvert, then generate as with transformers
    (with the OUT's tokenizer; an OUT whose source had none gets the load alone)."""
    integer_only = any(layout.model_runtime is not None for layout in _layouts(qc))
    what = ("I-LLM's integer-only model: transformers' generate and forward" if integer_only
            else "a transformers causal LM")
    where = f'snapshot_download("{repo_id}")' if repo_id else '"path/to/this/model"'
    return (["## Use", "",
             "This repository holds qconvert's native format; load it with qconvert, which runs the "
             "quantized layers with their exact integer arithmetic (`qconvert generate PATH --prompt TEXT` "
             "does the same from the shell):", "",
             "```python", "import qconvert"]
            + (["from huggingface_hub import snapshot_download"] if repo_id else [])
            + (["from transformers import AutoTokenizer", "",
                f"path = {where}",
                f"model, tok = qconvert.load(path), AutoTokenizer.from_pretrained(path)  # {what}",
                'ids = tok("The capital of France is", return_tensors="pt").input_ids',
                "print(tok.decode(model.generate(ids, max_new_tokens=32)[0], skip_special_tokens=True))"]
               if tokenizer else
               ["", f"model = qconvert.load({where})  # {what}; the source had no tokenizer: take its model's own"])
            + ["```"])


def _preset_tags(preset: str, weights: dict) -> list[str]:
    bits = {"int": "int", "float": "fp"}.get(weights.get("type"), "") + str(weights.get("num_bits", ""))
    return [bits, preset.lower().replace("_dynamic", "")]


def _serving_rows(findings: list) -> list[list]:
    """One row per (vLLM scheme, kernel, level, note), with how many layers it covers."""
    counts = Counter((f.get("scheme"), f.get("kernel"), f.get("level"), f.get("note") or "")
                     for f in findings if isinstance(f, dict))
    return [[n, *key] for key, n in counts.items()]


def _export_scheme_rows(marker: dict, qcfg: dict, group: dict, origin: dict) -> list[tuple[str, str]]:
    """What an export holds, from its config.json's scheme (``group``: its one config group) and its record."""
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    g, split = weights.get("group_size"), marker.get("split_from_group_size")
    how_w = (f"{weights.get('num_bits')}-bit {weights.get('type')}, {'symmetric' if weights.get('symmetric') else 'asymmetric'}, "
             f"per {weights.get('strategy')}" + (f" of {g}" if g else ""))
    if split:
        how_w += (f" (qconvert's groups of {split}, each written as {split // g} groups with its scale: the same "
                  "weights; compressed-tensors has no padded group)")
    how_a = ("float (not quantized)" if not acts else
             f"{acts.get('num_bits')}-bit {acts.get('type')}, {'dynamic' if acts.get('dynamic') else 'static'}, "
             f"per {acts.get('strategy')}")
    rows = [("weights", how_w), ("input activations", how_a),
            ("weight_scale", f"{marker.get('scale_dtype')}, largest relative rounding of a scale "
                             f"{float(marker.get('max_scale_rel_error') or 0):.1e}")]
    rows += _rotation_rows(origin) + _multimodal_rows(origin) + _solver_rows(origin.get("base"), origin.get("calibration"), origin.get("float_path"))
    ignored = qcfg.get("ignore") or []
    rows.append(("quantized", f"{marker.get('layers', '?')} linear layers; in full precision: embeddings, norms"
                              + (f", {', '.join(ignored)}" if ignored else "")))
    rows.append(("made by", f"{marker.get('producer', 'qconvert')} (`qconvert export`)"))
    return rows


def _export_accuracy_lines(out: Path, marker: dict, quantized_acts: bool, unloadable: str | None = None) -> list[str]:
    """The perplexities of the export itself (in transformers) and of its OUT (qconvert's runtime)."""
    evals = perplexity_rows(marker.get("eval"))
    own = saved_evals(out / EVAL_FILE)
    lines = []
    if own:
        lines += ["Perplexity of this export as transformers runs it, measured by `qconvert eval` (non-overlapping "
                  "windows; lower is better):", ""] + _eval_table(own) + [""]
    if evals:
        lines += ["Perplexity measured by `qconvert eval` on the qconvert OUT this was exported from, with qconvert's "
                  "runtime (the same weights"
                  + ("; transformers and vLLM quantize the activations on their own int8 grid, so their figures "
                     "differ slightly" if quantized_acts else "") + "):", ""] + _eval_table(evals) + [""]
    if not own and not evals:
        lines += ["Perplexity: not measured (`qconvert eval OUT --data-file wiki.test.raw` measures the OUT it was "
                  "exported from, the same weights)." if unloadable else
                  "Perplexity: not measured (`qconvert eval OUT-CT --data-file wiki.test.raw` measures this export "
                  "in transformers and saves it here).", ""]
    return lines


def _export_serving_lines(marker: dict) -> list[str]:
    findings = marker.get("serving") or []
    if not (marker.get("target") and findings):
        return ["Not checked against vLLM's rules at export (`--target vllm:sm90` does).", ""]
    from qconvert.serving import VLLM_VERSION

    return [f"Checked before export against vLLM {VLLM_VERSION}'s rules ({marker['target']}, tensor parallel "
            f"{marker.get('tensor_parallel', 1)}), layer by layer:", ""] + \
        _table(["layers", "vLLM scheme", "kernel", "level", "note"], _serving_rows(findings)) + [""]


def _export_use_lines(marker: dict, repo_id: str | None, prov: "_Provenance", name: str,
                      unloadable: str | None = None) -> list[str]:
    """How transformers (unless ``unloadable`` says why it cannot) and vLLM load it, and the
    commands that made it."""
    where = repo_id or "path/to/this/model"
    tp = int(marker.get("tensor_parallel") or 1)
    if unloadable:
        lines = ["## Use", "", f"Not with transformers: {unloadable}.", ""]
    else:
        lines = ["## Use", "", "With transformers (and `pip install compressed-tensors`):", "", "```python",
                 "from transformers import AutoModelForCausalLM", "",
                 f'model = AutoModelForCausalLM.from_pretrained("{where}")', "```", ""]
    if marker.get("preset") == "W4A16_ASYM":
        lines += ["Asymmetric int4 weights (zero points): transformers 5.24 with compressed-tensors 0.20.1 cannot load "
                  "them yet (it expects the zero points unpacked); vLLM serves them.", ""]
    lines += ["With vLLM:", "", "```bash", f"vllm serve {where}" + (f" --tensor-parallel-size {tp}" if tp > 1 else ""),
              "```", ""]
    export_cmd = f"{EXPORT_HINT} -o out-ct/"
    if marker.get("target"):
        export_cmd += f" --target {marker['target']}" + (f" --tensor-parallel {tp}" if tp > 1 else "")
    command = prov.quantize_command(name, exclude=prov.report.get("exclude"))
    return lines + ["## Reproduce", "", "```bash", command, export_cmd.replace(" OUT ", " out/ "),
                    "```", "", f"`{EXPORT_MARKER}` records how it was exported and the size of every file here.", ""]


def export_card(out: str | os.PathLike, repo_id: str | None = None) -> str:
    """The README.md for a compressed-tensors export of an OUT (``qconvert export``): what it
    holds, where it comes from, what was measured on it and its OUT, how transformers and vLLM
    load it.  Pure: reads the export's config.json, qconvert_export.json and eval.json."""
    import yaml

    from qconvert.multimodal import transformers_cannot_load

    out = Path(out)
    marker = check_export_complete(out)
    cfg = _read_json(out / "config.json")
    unloadable = transformers_cannot_load(cfg.get("model_type"))
    qcfg = cfg["quantization_config"]
    groups = qcfg.get("config_groups") or {}
    group = next(iter(groups.values()), {}) if isinstance(groups, dict) else {}
    origin = _public_origin(marker.get("origin") or {})
    prov = _Provenance.of(origin, cfg)
    name, preset = marker.get("scheme") or "?", str(marker.get("preset") or "?")
    tags = ["quantized", "compressed-tensors", "qconvert", name, *_preset_tags(preset, group.get("weights") or {})]
    task = "image-text-to-text" if isinstance(origin.get("multimodal"), dict) else "text-generation"
    meta = {**prov.meta(), "library_name": "transformers", "pipeline_tag": task,
            "tags": [t for i, t in enumerate(tags) if t and t not in tags[:i]]}
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    lines = [f"# {prov.title(repo_id, name + '-' + preset.lower())}", "",
             f"{prov.origin} quantized by qconvert with the scheme **{name}** and exported to compressed-tensors "
             f"(`{qcfg.get('format')}`, {preset}): "
             f"{'vLLM loads' if unloadable else 'transformers and vLLM load'} it as it is.",
             ""] + prov.source_lines()
    lines += ["## Scheme", ""] + _table(["part", "how"], _export_scheme_rows(marker, qcfg, group, origin)) + [""]
    mine = _out_files(out)
    lines += ["## Size", ""] + _table(["what", "size"], [
        prov.size_row(), ["these weights (safetensors)", _mb(sum(f.size for f in mine if f.path_in_repo.endswith(".safetensors")))],
        ["all files here but this card", _mb(sum(f.size for f in mine))]]) + [""]
    lines += ["## Accuracy", ""] + _export_accuracy_lines(out, marker, bool(group.get("input_activations")), unloadable)
    lines += ["## Serving", ""] + _export_serving_lines(marker)
    lines += _export_use_lines(marker, repo_id, prov, name, unloadable)
    return "---\n" + front + "---\n\n" + "\n".join(lines)


def card_for(out: str | os.PathLike, repo_id: str | None = None) -> str:
    """The generated card of what ``push`` would upload: an export's, or an OUT's."""
    return export_card(out, repo_id) if is_export(Path(out)) else model_card(out, repo_id)


# ----------------------------------------------------------------------------- the push


@dataclass
class PushResult:
    repo_id: str
    revision: str | None
    files: list[UploadFile]
    card: str
    commit_url: str | None = None
    branch_created: bool = False
    warnings: list[str] | None = None  # what goes up that the user may not want public


def _path_warnings(out: Path) -> list[str]:
    """Local paths that go up as they are: an OUT made before config.json left out transformers'
    ``_name_or_path`` (the file is in manifest.json, so it is not rewritten here)."""
    where = (_read_json(out / "config.json") or {}).get("_name_or_path")
    if isinstance(where, str) and (os.path.isabs(where) or os.sep in where):
        return [f"config.json records the local path {where} (_name_or_path; qconvert leaves it out since 0.4.0): "
                "re-quantize with --force to publish without it"]
    return []


def _network_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of whichever HTTP client this huggingface_hub uses."""
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod in ("httpx2", "httpx"):
        try:
            errs.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    try:
        import requests

        errs += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(errs)


def _token(token: str | None) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()  # HF_TOKEN, then the login cache (hf auth login); no network
    if not found:
        raise QConvertError(
            "no Hugging Face token: pass --token, set HF_TOKEN, or log in once with `hf auth login` "
            "(formerly huggingface-cli login); the token needs write access"
        )
    return found


def _hub_error(e: Exception, repo_id: str) -> QConvertError:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError):
        resp = getattr(e, "response", None)
        status = getattr(resp, "status_code", None)
        server = (getattr(e, "server_message", None) or "").strip().splitlines()
        detail = f" (the Hub says: {server[0]})" if server else ""
        if status == 401:
            return QConvertError(
                f"the Hub rejected the token (401){detail}: it is invalid or expired; create a write token at "
                "https://huggingface.co/settings/tokens and pass it with --token or `hf auth login`"
            )
        if status == 403:
            return QConvertError(
                f"the token may not write to {repo_id} (403){detail}: the repo belongs to another user or organization, "
                "or the token is read-only; push to a repo under your own namespace, or use a token with write access to it"
            )
        if status == 404:
            return QConvertError(
                f"{repo_id} was not found on the Hub (404){detail}; check the repo id (owner/name) and that the token can see it"
            )
        return QConvertError(f"the Hub refused the push to {repo_id} (HTTP {status}){detail}; try again later")
    return QConvertError(
        f"cannot reach the Hugging Face Hub ({type(e).__name__}: {e}); check the network connection (or the "
        "HF_ENDPOINT) and repeat the push; the upload is one commit, so nothing half-done was left on the Hub"
    )


def push(out: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None, dry_run: bool = False, card: str | None = None) -> PushResult:
    """Upload OUT with its model card to ``repo_id`` in a single commit.

    ``revision`` names a branch, created when missing; ``card`` replaces the generated
    README.md.  ``dry_run`` only plans: no token is needed and the network is never touched.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    out = Path(out)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise QConvertError(f"{repo_id!r} is not a valid Hub repo id ({e}); write it as owner/name or name") from e
    marker = check_export_complete(out) if is_export(out) else None
    if marker is None:
        check_complete(out)
    text = card if card is not None else card_for(out, repo_id)
    files = upload_files(out, text, "generated card" if card is None else "")
    result = PushResult(repo_id, revision, files, text, warnings=_path_warnings(out))
    if dry_run:
        return result
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise QConvertError("HF_HUB_OFFLINE is set, and a push needs the network: unset it (or use --dry-run)")
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=_token(token))
    ops = [CommitOperationAdd(path_in_repo=f.path_in_repo,
                              path_or_fileobj=str(f.local) if f.local is not None else f.data)
           for f in files]
    scheme = (marker.get("scheme") if marker is not None else
              json.loads((out / "config.json").read_text())["quantization_config"].get("scheme")) or "?"
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        result.repo_id = getattr(url, "repo_id", None) or repo_id  # a bare name lands in the token's namespace
        if revision and revision != "main":
            branches = {b.name for b in api.list_repo_refs(result.repo_id, repo_type="model").branches}
            if revision not in branches:
                api.create_branch(result.repo_id, branch=revision, repo_type="model", exist_ok=True)
                result.branch_created = True
        what = f"{scheme}, compressed-tensors" if marker is not None else scheme
        info = api.create_commit(result.repo_id, ops, commit_message=f"qconvert {what}: upload {len(files)} files",
                                 repo_type="model", revision=revision)
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from e
    except _network_errors() as e:
        raise _hub_error(e, repo_id) from e
    result.commit_url = getattr(info, "commit_url", None)
    return result
