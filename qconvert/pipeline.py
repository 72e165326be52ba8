"""The conversion loop: SOURCE -> skeleton -> block by block -> OUT (docs/format.md).

One direction, no back and forth: tensors outside the decoder blocks are copied, then each
block's tensors are read from the source, its target linears quantized by the method, the
results streamed into the output shards and dropped.  Memory is one block, whatever the
depth.  Output goes to ``OUT.partial`` and appears as OUT only by a final rename.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from qconvert import __version__, multimodal, placement
from qconvert._memory import return_freed_memory_to_os, reuse_freed_memory
from qconvert.calibration_text import CalibSettings
from qconvert.block_walk import BATCH_TOKENS, CALIB_DIR, Calibrator
from qconvert.errors import OnlineUnsupported, QConvertError, RotationUnsupported
from qconvert.journal import Journal, fault_point
from qconvert.formats.native import FORMAT_NAME, FORMAT_VERSION, is_native, write_manifest
from qconvert.formats.safetensors_io import FLOAT_DTYPES, ShardedWriter
from qconvert.fsutil import check_not_mount_point, check_writable_parent, parse_size, swap_into_place
from qconvert.methods import get_method
from qconvert.methods.base import Method, relative_weight_error
from qconvert.moe import is_moe
from qconvert.schemes_registry import Scheme, load_scheme, with_params
from qconvert.solvers.gptq import asymmetric_target
from qconvert.solvers.rotation import RotatedSource
from qconvert.skeleton import build_skeleton, target_linears, tied_lm_head
from qconvert.architectures import DECODER_LAYERS
from qconvert.source import Source, provenance, resolve_source, transformers_bars

BLOCK = re.compile(rf"^{re.escape(DECODER_LAYERS)}\.(\d+)\.")


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_output(out: Path, force: bool, resume: bool) -> None:
    """Refuse, before any heavy work, what would clobber or confuse an output."""
    if out.parent == out:
        raise QConvertError(f"-o {out} is a filesystem root; name a directory to create")
    inside = next((d for d in out.resolve().parents if is_native(d)), None)
    if inside is not None:  # its manifest would no longer list its files: verify fails, push uploads both
        raise QConvertError(f"-o {out} is inside the qconvert output {inside}, which would then fail verify; "
                            "choose a directory outside it")
    check_not_mount_point(out)
    if out.exists() and not force:
        raise QConvertError(f"{out} already exists; pass --force (Python: force=True) to overwrite it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise QConvertError(f"{out} exists and is not a directory; remove it or choose another -o")
    if out.is_dir() and any(out.iterdir()) and not is_native(out):
        raise QConvertError(
            f"{out} is not empty and is not a qconvert output; --force only replaces those: choose another -o"
        )
    check_writable_parent(out)
    partial = partial_dir(out)
    if partial.exists() and not (resume or force):
        raise QConvertError(
            f"{partial} holds an interrupted conversion; pass --resume to continue it, or --force to start over"
        )


OPENED_PARTIALS: list[Path] = []  # the partial directories this process opened (the CLI's Ctrl-C message names them)


def open_partial(out: Path, resume: bool) -> tuple[Path, Journal | None]:
    """The partial directory, and the journal of an interrupted run to resume (or None)."""
    partial = partial_dir(out)
    OPENED_PARTIALS.append(partial)
    if resume and partial.is_dir():
        journal = Journal.read(partial)
        if journal is not None:
            return partial, journal
    if partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir()
    except OSError as e:
        raise QConvertError(f"cannot create {partial} ({e.strerror}); choose a writable -o") from e
    return partial, None


def plan_tensors(source: Source, skeleton, targets) -> tuple[dict[str, str], list[tuple[str, list[str]]]]:
    """Map every skeleton tensor to its source tensor and group the names into stages.

    Returns (source name of each output tensor, [(stage label, tensor names)]): the tensors
    outside the blocks, then each decoder block in order.
    """
    have = set(source.keys())
    tied = tied_lm_head(skeleton)
    names = {}
    for name, p in skeleton.state_dict(keep_vars=True).items():
        if not isinstance(p, torch.nn.Parameter):
            continue  # buffers (rotary tables) are rebuilt from the config, never stored
        if tied and name == "lm_head.weight":
            if "lm_head" not in targets:
                continue  # stays tied to the embedding; nothing to store
            src = name if name in have else "model.embed_tokens.weight"
        else:
            src = name
        if src not in have:
            raise QConvertError(
                f"the config and the tensors disagree: {source.description} has no tensor '{src}' "
                "that the config implies; check that config.json belongs to these weights"
            )
        names[name] = src
    stages: dict[str, list[str]] = defaultdict(list)
    for name in names:
        m = BLOCK.match(name)
        stages[f"block {int(m.group(1)):>3}" if m else "rest"].append(name)
    rest = stages.pop("rest", [])
    blocks = sorted(stages.items(), key=lambda kv: int(kv[0].split()[1]))
    return names, [("embeddings and head", rest)] + blocks


@dataclass
class _Job:
    """Everything a conversion decided before the first block is read."""

    out: Path
    src: Source
    scheme: Scheme
    method: Method
    calib: CalibSettings | None
    config: object
    skeleton: object
    targets: dict
    names: dict  # output tensor -> source tensor
    stages: list  # [(label, tensor names)]
    expected: dict  # output tensor -> shape the config implies
    settings: dict  # what the journal records and a resumed run must match
    shard_bytes: int
    device: torch.device = torch.device("cpu")  # where the calibrated walk runs (qconvert/placement.py)
    gpu_budget: int = 0  # bytes of GPU memory the calibration activations may take
    calib_text_seconds: float | None = None  # reading or writing the calibration tokens (None: resumed, or none)
    rotation_skipped: str | None = None  # why the scheme's default rotation did not apply (``_rotated``)
    float_path: str | None = None  # the kernels calibration runs through (placement.float_path); None: uncalibrated
    float_dtype: torch.dtype | None = None  # what OUT's unquantized float tensors are cast to (None: kept as read)


def quantize(
    source: str | Source,
    scheme: str | Scheme,
    out: str | os.PathLike,
    *,
    group_size: int | None = None,
    quantize_lm_head: bool = False,
    exclude: tuple[str, ...] = (),
    force: bool = False,
    resume: bool = False,
    max_shard_size: str | int = "2GB",
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    base: str | None = None,
    calib: CalibSettings | dict | None = None,
    params: dict | None = None,
    json_report: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    announce=None,
    rotate: str | None = None,
    rotate_seed: int = 0,
    float_dtype: str | None = None,
) -> Path:
    """Quantize SOURCE with SCHEME into the directory OUT (see docs/format.md); returns OUT.

    ``resume`` continues an interrupted run from its ``OUT.partial`` journal (the result is
    bit-identical to an uninterrupted run on the same device); ``force`` replaces an existing
    OUT.  ``base`` ("rtn" or "gptq") overrides the scheme's weight solver; ``calib`` says where
    GPTQ's calibration tokens come from (default: text the model writes itself, 128 x 128): a
    ``CalibSettings`` or a dict of its fields, e.g. ``{"source": "c4", "data_file": "c4.jsonl"}``.
    ``params`` overrides the scheme's method parameters (``--param``), e.g. ``{"lorc_rank": 0}``.
    ``progress`` False also keeps transformers' own bars (reading a checkpoint or a GGUF file) off.
    ``device`` ("cuda", "cuda:N", "cpu"; None: cuda when usable) is where calibration runs
    (qconvert/placement.py); ``announce(line)``, if given, receives the line that says which.
    ``json_report`` also writes the per-layer report (qconvert.json) to that path.  ``rotate``
    ("none", "hadamard", "random"; None: the scheme's) rotates the residual stream first
    (qconvert/solvers/rotation.py), drawn from ``rotate_seed``.  ``float_dtype`` ("float16", "bfloat16",
    "float32"; None or "auto": ``Source.float_dtype``) is what OUT keeps its unquantized tensors in.
    """
    t_start = time.perf_counter()
    sch = scheme if isinstance(scheme, Scheme) else load_scheme(scheme)
    if params:  # first, as the CLI's --param: the named options (group_size=, base=) win over them
        sch = with_params(sch, dict(params))
    sch = sch.with_overrides(group_size=group_size, quantize_lm_head=quantize_lm_head, exclude=tuple(exclude), base=base,
                             rotate=rotate)
    skipped: list[str] = []  # why the scheme's own rotation did not apply (an explicit --rotate raises instead)
    if isinstance(source, Source):
        source = _rotated(source, sch, rotate_seed, rotate is not None, skipped)
    with transformers_bars(progress):
        job = _prepare(source, sch, Path(os.path.abspath(out)), force, resume, max_shard_size, calib,
                       lambda spec: _rotated(resolve_source(spec, revision, trust_remote_code, allow_pickle), sch,
                                             rotate_seed, rotate is not None, skipped),
                       device, announce, skipped, float_dtype, tuple(exclude))
        partial, journal = open_partial(job.out, resume)
        if journal is not None and journal.settings != job.settings:
            raise QConvertError(
                f"{partial} was started with other settings ({_first_difference(journal.settings, job.settings)}); "
                "repeat the original command with --resume, or pass --force to start over"
            )
        _announce_resume(job, partial, journal, resume, announce)
        report, timing = _convert_or_explain(job, partial, journal, progress)
    timing["seconds"] = round(time.perf_counter() - t_start, 2)
    if json_report is not None:  # OUT's report plus the times, which OUT leaves out to stay reproducible
        Path(json_report).write_text(json.dumps({**report, "timing": timing}, indent=2) + "\n")
    try:
        swap_into_place(partial, job.out)  # --force: checked above to be a qconvert output or empty
    except OSError as e:
        raise QConvertError(f"moving the finished {partial.name} to {job.out} failed ({e.strerror or e}); it is "
                            f"complete in {partial}: rename it yourself, or fix the cause and convert again") from e
    return job.out


def _convert_or_explain(job: _Job, partial: Path, journal, progress: bool) -> tuple[dict, dict]:
    """``_convert``, its failures said in one line: bad input leaves nothing, the others keep the journal."""
    try:
        with placement.deterministic(job.device):
            return _convert(job, partial, journal, progress)
    except QConvertError:
        # bad input: nothing worth resuming, and nothing half-written may stay behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except placement.OutOfMemoryError as e:  # the journal stays: --resume continues with less on the GPU
        placement.release(e)
        done = (Journal.read(partial) or Journal(partial, {})).stages_done
        limit = job.calib.max_gpu_memory if job.calib is not None else None
        raise QConvertError(placement.out_of_memory_message(
            e, job.device, partial, done, parse_size(limit, allow_zero=True) if limit is not None else None)) from e
    except OSError as e:
        raise QConvertError(
            f"writing {partial} failed ({e.strerror or e}); the finished blocks are kept: fix the cause "
            "(free disk space, permissions) and repeat the command with --resume"
        ) from e


def _announce_resume(job: _Job, partial: Path, journal, resume: bool, announce) -> None:
    """--resume says where it goes on from (or that there was nothing to resume); a resumed run on
    another float path than its journal's last block says so."""
    if announce is None or not resume:
        return
    if journal is None:
        announce(f"nothing to resume in {partial.name} (no interrupted conversion there): starting from the beginning")
        return
    blocks = len(job.stages) - 1
    announce(f"resuming {partial.name}: {journal.stages_done} of {len(job.stages)} stages done (the embeddings and "
             f"head, then {blocks} blocks); going on with the next")
    before = journal.stage_paths[-1]  # a journal holds at least one stage
    if job.float_path and before != job.float_path:
        announce(f"resuming on another float path than {partial.name}'s last block was made on "
                 f"({before or 'not recorded'}; now {job.float_path}): the finished blocks stay, and the "
                 "result will differ from an uninterrupted run; qconvert.json says which blocks ran where")


def _prepare(source, sch: Scheme, out: Path, force: bool, resume: bool, max_shard_size, calib, resolve,
             device=None, announce=None, skipped=(), float_dtype=None, user_exclude=()) -> _Job:
    """Validate the scheme and the output, read the source's config, plan the stages."""
    method = get_method(sch.method, sch.params)  # validates the parameters before any heavy work
    explicit_dtype = parse_float_dtype(float_dtype)
    calib = CalibSettings.of(calib).validated()  # a bad option is refused even where it goes unused
    calib = calib if method.needs_calibration else None
    walk_device = _walk_device(device, calib is not None)
    shard_bytes = parse_size(max_shard_size)
    check_output(out, force, resume)
    if calib is not None:  # the walk reuses its large temporaries: keep them in the heap
        reuse_freed_memory()
    else:  # streaming: one tensor at a time, handed back to the OS when done
        return_freed_memory_to_os()
    src = source if isinstance(source, Source) else resolve(source)
    src_dir = getattr(src, "directory", None) or getattr(src, "path", Path("/nonexistent")).parent
    if out == Path(os.path.abspath(src_dir)) or out in Path(os.path.abspath(src_dir)).parents:
        raise QConvertError(f"-o {out} would overwrite the source {src.description}; choose another -o")
    config = src.config
    method.check_config(config)
    store_dtype = explicit_dtype or src.float_dtype
    asym_note = None  # why the scheme's default --asym-calib did not apply
    if calib is not None:
        calib = calib.for_model(config)
        if calib.asym is None:  # no --asym-calib: the scheme's
            asym = sch.asym_calib if _defaults_apply(sch) else 0.0
            if asym and is_moe(config):  # block_walk cannot pair a mixture of experts' float and quantized tokens
                asym, asym_note = 0.0, (f"symmetric calibration: {sch.name}'s default --asym-calib {sch.asym_calib:g} "
                                        "cannot pair a mixture-of-experts model's float and quantized tokens")
            calib = replace(calib, asym=asym)
    skeleton = build_skeleton(config)
    targets = target_linears(skeleton, sch.exclude, must_match=user_exclude)
    names, stages = plan_tensors(src, skeleton, targets)
    settings = {
        "qconvert_version": __version__, "source": src.description, "scheme": sch.name, "method": sch.method,
        "params": sch.params, "exclude": list(sch.exclude), "max_shard_bytes": shard_bytes,
    }
    if calib is not None:
        settings["calibration"] = calib.key()
    if store_dtype is not None:  # a journal without it is one that kept every dtype as read
        settings["float_dtype"] = dtype_name(store_dtype)
    if isinstance(src, RotatedSource):
        settings["rotation"] = {"mode": src.mode, "seed": src.seed, **({"online": True} if src.online else {})}
    budget = 0
    if walk_device.is_cuda:  # a CPU run's journal is as before: it resumes either way
        settings["device"] = "cuda"
        batch_tokens = max(1, BATCH_TOKENS // calib.seqlen) * calib.seqlen
        max_gpu = parse_size(calib.max_gpu_memory, allow_zero=True) if calib.max_gpu_memory is not None else None
        budget = placement.gpu_budget(walk_device.device, max_gpu, placement.block_working_set(config, batch_tokens))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict(keep_vars=True).items()}
    if announce is not None:  # once the source has been read and the run planned
        notes = _plan_notes(src, targets, skipped, calib, asym_note, store_dtype)
        announce("; ".join([walk_device.line, *notes, *_float_dtype_note(src, explicit_dtype)]))
    return _Job(out, src, sch, method, calib, config, skeleton, targets, names, stages, expected, settings, shard_bytes,
                walk_device.device, budget, rotation_skipped=skipped[-1] if skipped else None,
                float_path=placement.float_path(walk_device.device) if calib is not None else None,
                float_dtype=store_dtype)


def parse_float_dtype(name: str | None) -> torch.dtype | None:
    """``--float-dtype``: a dtype, or None for "auto" (the source's own precision)."""
    if name is None or name == "auto":
        return None
    if name not in FLOAT_DTYPES:
        raise QConvertError(f"unknown --float-dtype {name!r}; known: auto, {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _float_dtype_note(src: Source, explicit: torch.dtype | None) -> list[str]:
    """The quantize line's word on a source read wider than it is stored (a GGUF file)."""
    if explicit is None and src.float_dtype is not None:
        return [f"unquantized tensors stored in {dtype_name(src.float_dtype)}, the precision of the {src.kind} "
                "file's own floats (--float-dtype float32 keeps them as read)"]
    return []


def _stored_dtype(store: torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """What a tensor read as ``dtype`` is written as: ``store`` (the run's float dtype) if it is a float."""
    return store if store is not None and dtype.is_floating_point else dtype


def _cast_checked(name: str, dtype: torch.dtype, slices):
    """Pass ``slices`` (finite) through cast to ``dtype``, failing where a value leaves its range."""
    for part in slices:
        if part.dtype != dtype:
            cast = part.to(dtype)
            if not bool(torch.isfinite(cast).all()):
                big = float(part.abs().max())
                raise QConvertError(f"'{name}' holds values beyond {dtype_name(dtype)}'s range (|x| up to {big:.3g}); "
                                    "pass --float-dtype float32 or bfloat16")
            part = cast
        yield part


def _plan_notes(src, targets, skipped, calib, asym_note, store_dtype=None) -> list[str]:
    """What the quantize line says beyond the device: the rotation (or why the default was
    skipped) and asymmetric calibration (or why the default was dropped), each with how to turn it off."""
    notes = []
    if isinstance(src, RotatedSource):
        notes.append(f"residual stream rotated ({src.mode}, seed {src.seed})")
        if src.online:
            notes.append("down_proj's input rotated online")
        if src.untied:
            notes.append(f"lm_head untied from the embedding ({_head_cost(src, targets, store_dtype)}; "
                         "--rotate none keeps it tied)")
    if skipped:
        notes.append(skipped[-1])
    if calib is not None and calib.asym:
        notes.append(f"each layer aimed at the float model's output (--asym-calib {calib.asym:g}; 0 turns it off)")
    elif asym_note:
        notes.append(asym_note)
    return notes


def _defaults_apply(sch: Scheme) -> bool:
    """A scheme's default rotation and asymmetric calibration were measured with GPTQ: under
    ``--base rtn`` they stay off (an explicit --rotate or --asym-calib still applies)."""
    return sch.params.get("base") != "rtn"


def _head_cost(src: RotatedSource, targets, store_dtype=None) -> str:
    """What the untied head adds to OUT: the embedding's bytes again, unless it is quantized."""
    dtype, shape = src.info("lm_head.weight")
    dtype = _stored_dtype(store_dtype, dtype)
    if "lm_head" in targets:
        return f"{shape[0]} x {shape[1]} more weights, quantized"
    return f"+{math.prod(shape) * dtype.itemsize / 1e6:,.1f} MB in {dtype_name(dtype)}"


def _rotated(src: Source, sch: Scheme, seed: int, explicit: bool, skipped: list[str]) -> Source:
    """``src`` rotated as the scheme says (``--rotate``), or ``src`` itself.  A model the rotation
    does not support stops an ``explicit`` ``--rotate``; under the scheme's default it is quantized
    unrotated (or, when only the online transform does not apply, rotated offline), and ``skipped``
    receives the reason (announced, and kept in the report)."""
    if sch.rotate == "none" or isinstance(src, RotatedSource):
        return src
    if not explicit and not _defaults_apply(sch):
        skipped.append(f"not rotated: {sch.name}'s default --rotate {sch.rotate} goes with GPTQ, and --base rtn "
                       "was asked (at 4 bits it lost accuracy rotated, docs/accuracy.md); --rotate hadamard forces it")
        return src
    mode, _, online = sch.rotate.partition("+")
    try:
        return RotatedSource(src, mode, seed, online=online == "online")
    except RotationUnsupported as e:
        if explicit:
            raise
        if isinstance(e, OnlineUnsupported):
            skipped.append(f"online transform skipped: {sch.name}'s default --rotate {sch.rotate} does not apply "
                           f"({str(e).split(': ')[0]}); rotated offline only")
            return RotatedSource(src, mode, seed)
        skipped.append(f"not rotated: {sch.name}'s default --rotate {sch.rotate} does not apply ({str(e).split('; ')[0]})")
        return src


def _walk_device(device, calibrated: bool) -> placement.WalkDevice:
    """Where the walk runs; without calibration everything streams on the CPU (an explicit
    ``--device cuda`` is still checked, so that a missing GPU is never a silent surprise)."""
    if calibrated:
        return placement.resolve_device(device)
    if device is not None and str(device) != "cpu":
        placement.resolve_device(device)
    return placement.WalkDevice(torch.device("cpu"), "quantizing on cpu (round-to-nearest: no calibration, "
                                                     "tensors stream one at a time)")


def _convert(job: _Job, partial: Path, journal: Journal | None, progress: bool) -> tuple[dict, dict]:
    """Every stage not yet journaled, then the metadata and manifest; returns (report, timing)."""
    metadata = {"producer": f"qconvert {__version__}"}
    if journal is None:
        journal = Journal.create(partial, job.settings)
        writer = ShardedWriter(partial, job.shard_bytes, metadata)
    else:
        writer = ShardedWriter(partial, job.shard_bytes, metadata, state=journal.writer_state)
    layers, modules = list(journal.layers), dict(journal.modules)
    calibrator = None
    if job.calib is not None:
        calibrator = _start_calibration(job, partial, journal, progress)
    todo = job.stages[journal.stages_done:]
    # the embeddings and head make a first stage, then each decoder block (SmolLM2: 1 + 30)
    bar = tqdm(todo, desc=f"quantize {job.scheme.name}", unit="stage", disable=not progress,
               initial=journal.stages_done, total=len(job.stages))
    stage_seconds = {}
    for label, stage in bar:
        t0 = time.perf_counter()
        new_layers, new_modules = _write_stage(job, writer, calibrator, label, stage, bar)
        layers += new_layers
        modules.update(new_modules)
        journal.stage_done(writer.sync(), new_layers, new_modules, calibrator.checkpoint() if calibrator else None,
                           job.float_path)
        stage_seconds[label.strip()] = round(time.perf_counter() - t0, 2)
    writer.close()
    fault_point("closed")
    timing = {"resumed": journal.stages_done != len(todo), "device": str(job.device), "stage_seconds": stage_seconds,
              "calib_text_seconds": job.calib_text_seconds}
    if job.device.type == "cuda":
        timing["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(job.device)
    if calibrator is not None:
        shutil.rmtree(partial / CALIB_DIR, ignore_errors=True)
        timing.update({k + "_seconds": round(v, 2) for k, v in calibrator.seconds.items()})
    timing["solve_seconds"] = round(sum(r.get("gptq_seconds", 0.0) for r in layers), 2)
    carried = multimodal.write_carried(job.src, partial, job.shard_bytes, metadata)
    report = _write_metadata(partial, job, modules, layers, _float_path_record(job, journal.stage_paths), carried)
    journal.remove()
    write_manifest(partial)
    fault_point("finished")
    return {**report, "layers": layers}, timing


def _write_stage(job: _Job, writer, calibrator, label: str, stage: list[str], bar) -> tuple[list, dict]:
    """Quantize (or copy) one stage's tensors into the shards; returns its report rows and layouts."""
    src, targets = job.src, job.targets
    for name in stage:
        _check_tensor(src, job.names[name], job.expected[name], name.rsplit(".", 1)[0] in targets and name.endswith(".weight"))
    solved, changed = {}, {}
    if calibrator is not None and label.startswith("block"):
        solved, changed = _calibrated_block(calibrator, job.method, int(label.split()[1]), targets, bar)
    new_layers, new_modules = [], {}
    for name in stage:
        src_name = job.names[name]
        dtype, shape = src.info(src_name)
        stored = _stored_dtype(job.float_dtype, dtype)
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in targets:
            ql = solved.pop(module, None) or job.method.quantize_linear(module, _finite(src, src_name, src.get(src_name)))
            for suffix, tensor in ql.tensors.items():
                writer.add(f"{module}.{suffix}", tensor)
                fault_point("tensor")
            nbytes = sum(x.numel() * x.element_size() for x in ql.tensors.values())
            new_layers.append({"name": module, **ql.info, "bytes": nbytes, "fp16_bytes": 2 * shape[0] * shape[1]})
            new_modules[module] = ql.layout
        elif name in changed:  # rewritten by the method (I-LLM: smoothing folded into a norm)
            writer.add(name, next(_cast_checked(name, stored, [changed[name].to(dtype)])))
        else:  # copied slice by slice: an embedding is never whole in memory
            writer.add_rows(name, stored, tuple(shape),
                            _cast_checked(src_name, stored, _check_finite(src, src_name, src.iter_rows(src_name))))
            fault_point("tensor")
    return new_layers, new_modules


def _check_tensor(src: Source, src_name: str, expected: tuple, quantized: bool) -> None:
    dtype, shape = src.info(src_name)
    if tuple(shape) != expected:
        raise QConvertError(
            f"the config and the tensors disagree: '{src_name}' has shape {tuple(shape)}, the config implies {expected}"
        )
    if quantized and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise QConvertError(
            f"'{src_name}' is stored as {dtype}; qconvert quantizes float32/float16/bfloat16 "
            "weights: start from the original floating-point checkpoint"
        )


def _start_calibration(job: _Job, partial: Path, journal: Journal, progress: bool) -> Calibrator:
    """Calibration tokens (saved in OUT.partial for --resume) and the block-0 inputs."""
    src, calib = job.src, job.calib
    tokens_file = partial / CALIB_DIR / "tokens.i64"
    if journal.calib is not None and tokens_file.is_file():
        n = tokens_file.stat().st_size // 8
        tokens = torch.from_file(str(tokens_file), shared=False, size=n, dtype=torch.int64).view(calib.nsamples, -1)
    else:
        t0 = time.perf_counter()
        tokens = calib.tokens(src, progress, device=job.device)
        job.calib_text_seconds = round(time.perf_counter() - t0, 2)  # --json only: times vary run to run
        tokens_file.parent.mkdir(exist_ok=True)
        tokens.numpy().tofile(tokens_file)
    calibrator = Calibrator(src, job.skeleton, job.names, tokens, partial, calib.memory_budget(), progress=progress,
                            on_disk=journal.calib["on_disk"] if journal.calib is not None else None,
                            compute_dtype=calib.torch_dtype, device=job.device, max_gpu_memory=job.gpu_budget,
                            asym=calib.asym)
    if journal.calib is not None:
        calibrator.restore(journal.calib)
        calibrator.embed(fill=False)
    else:
        calibrator.embed()
    return calibrator


def _calibrated_block(calibrator: Calibrator, method: Method, index: int, targets, bar) -> tuple[dict, dict]:
    """Observe block ``index``, solve its linears, run it quantized; returns (module -> QuantizedLinear,
    full name -> tensor for the non-linear parameters the method rewrote, e.g. I-LLM's norms)."""
    block = calibrator.load_block(index)
    prefix = f"{DECODER_LAYERS}.{index}."
    mine = {name: mod for name, mod in targets.items() if name.startswith(prefix)}
    for name, mod in mine.items():
        _assert_finite(calibrator.src, calibrator.names[name + ".weight"], mod.weight)
    solved = {}

    def solve(groups) -> dict:
        run_as = {}
        for group in groups:
            weights = [mine[n].weight.detach() for n in group.names]
            shifted = None
            if group.shift is not None:  # --asym-calib: aim at the float model's output (GPTAQ)
                stacked = torch.cat(weights)
                target = asymmetric_target(stacked, group.hessian, group.shift, calibrator.asym,
                                           getattr(method.config, "damp", 0.01))
                shifted = relative_weight_error(stacked.float(), target)
                weights = list(target.split([w.shape[0] for w in weights]))
            amax = group.amax if method.wants_input_amax else None
            for name, ql in zip(group.names, method.quantize_linears(group.names, weights, group.hessian, amax)):
                ql.tensors = placement.to_host(ql.tensors)  # OUT is written from the CPU, in a CPU run's dtypes
                ql.info.update(calib_rows=group.rows, calib_fallback=group.fallback)
                if shifted is not None:
                    ql.info["asym_shift"] = shifted  # ‖W* - W‖ / ‖W‖ of the group
                solved[name] = ql
                run_as[name] = (ql.dequantized, ql.activation or method.activation_fake_quant)
                ql.dequantized = None
            worst = max(solved[n].info.get("gptq_loss", 0.0) for n in group.names)
            bar.set_postfix_str(f"block {index}: {group.names[0].rsplit('.', 1)[-1]} err {worst:.2e}")
        return run_as

    changed = {}

    def prepare(blk, feed):  # the method rewrites the block first; the tensors it changed are written
        changed.update(placement.to_host(method.prepare_block(prefix, blk, feed)))

    calibrator.quantize_block(block, mine, solve, prepare)
    calibrator.release_block(block)
    return solved, changed


def _first_difference(old: dict, new: dict) -> str:
    """The first setting that differs, in the order the settings are made (the scheme before what
    follows from it, such as the calibration's defaults); of a nested one, the entries that differ."""
    for k in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = [f"{s} {a.get(s)!r} then, {b.get(s)!r} now" for s in [*b, *(s for s in a if s not in b)]
                     if a.get(s) != b.get(s)]
            return f"{k}: " + "; ".join(inner)
        return f"{k}: {a!r} then, {b!r} now"
    return "unknown"


def _assert_finite(src: Source, name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise QConvertError(f"tensor '{name}' of {src.description} holds NaN or Inf; the checkpoint is damaged")


def _finite(src: Source, name: str, t: torch.Tensor) -> torch.Tensor:
    _assert_finite(src, name, t)
    return t


def _check_finite(src: Source, name: str, slices):
    """Pass ``slices`` through, failing on the first NaN or Inf."""
    for part in slices:
        _assert_finite(src, name, part)
        yield part


def _float_path_record(job: _Job, stage_paths: list) -> str | None:
    """What the report says about the float path: this run's, or, after resumes on other paths,
    each path with the stages it made (stages count the embeddings first, then the blocks)."""
    runs: list[list] = []  # [first stage, last stage, path]
    for i, path in enumerate(stage_paths, start=1):
        if runs and runs[-1][2] == path:
            runs[-1][1] = i
        else:
            runs.append([i, i, path])
    if job.float_path is None or len(runs) <= 1:
        return job.float_path
    return "; ".join(f"stages {a}-{b}: {p or 'not recorded'}" for a, b, p in runs)


def _write_metadata(partial: Path, job: _Job, modules: dict, layers: list, float_path: str | None = None,
                    carried: dict | None = None) -> dict:
    src, sch, method, calib = job.src, job.scheme, job.method, job.calib
    cfg = job.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)  # where transformers read the source: a local path, pushed with OUT otherwise
    if job.float_dtype is not None:  # the dtype transformers (and vLLM, for an export) load the model in
        cfg["dtype"] = dtype_name(job.float_dtype)
    if "lm_head" in modules and cfg.get("tie_word_embeddings"):
        cfg["tie_word_embeddings"] = False  # the head is stored quantized, apart from the embedding
    cfg["quantization_config"] = {
        "quant_method": "qconvert",
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "qconvert_version": __version__,
        "scheme": sch.name,
        "method": method.name,
        "config": method.describe(),
        "exclude": list(sch.exclude),
        "modules": modules,
        **({"online_rotation": {**src.online.describe(), "modules": src.online_modules()}}
           if isinstance(src, RotatedSource) and src.online is not None else {}),
    }
    (partial / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    has_tok = src.save_tokenizer(partial)
    totals = {
        "quantized_layers": len(layers),
        "quantized_bytes": sum(r["bytes"] for r in layers),
        "quantized_fp16_bytes": sum(r["fp16_bytes"] for r in layers),
        "min_headroom_bits": min((r["headroom_bits"] for r in layers if "headroom_bits" in r), default=None),
    }
    report = {
        "qconvert_version": __version__,
        "source": src.description,
        "source_kind": src.kind,
        "source_info": provenance(src),  # Hub id, commit, license, sha256 of each weight file
        "scheme": {"name": sch.name, "description": sch.description, "method": sch.method, "params": sch.params},
        "tokenizer": has_tok,
        "calibration": calib.key() if calib is not None else None,
        # GPTQ's roundings follow the float path's last bits: another CPU or GPU writes other tensors
        **({"float_path": float_path} if float_path else {}),
        **({"device": job.device.type} if job.device.type != "cpu" else {}),  # a CPU run's report is as before
        **({"rotation": src.describe()} if isinstance(src, RotatedSource) else {}),
        **({"rotation_skipped": job.rotation_skipped} if job.rotation_skipped else {}),
        # a multimodal checkpoint's parts outside the language model, in multimodal/ (qconvert/multimodal.py)
        **({multimodal.RECORD_KEY: carried} if carried else {}),
        "totals": totals,
        # times vary from run to run: they go to --json only, so that OUT is reproducible
        "layers": [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in layers],
    }
    (partial / "qconvert.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
