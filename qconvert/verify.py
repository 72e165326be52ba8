"""``qconvert verify``: is OUT intact, and does it still compute what its source computes?

Structure (no model run): the manifest's sha256 and size of every file; no file missing or
unaccounted for; every shard's safetensors header; every tensor with the dtype and shape
docs/format.md declares for its layout, given the model config; the int32 overflow bound
recomputed from the stored weights; config, index and report agreeing.

Numerics (against the source): per quantized linear, the SNR of its output against the
source layer on the source model's own activations; over the sequence, the KL divergence
and top-1 agreement of next-token distributions.  Sample text is the user's file, or text
the source model writes itself.

A source that does not fit in memory in float32 (more than half the available RAM; ``stream``
decides otherwise) is run *streamed*: one decoder block at a time is read from it, the
sample's hidden states run through the block (its linears' inputs and outputs caught for the
SNR), and the block is dropped, so memory holds the quantized model, one float32 block, the
embedding, the final norm and the head.  The source cannot then write its own text: without a
file, the sample is ``SAMPLE_TEXT``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qconvert.errors import QConvertError
from qconvert.formats.native import FORMAT_NAME, MANIFEST, READ_VERSIONS, read_quant_config, sha256_file

RESULT_FILES = ("verify.json", "eval.json", "bench.json")  # written into OUT after quantize
VERIFY_FILE = "verify.json"

# the sample of a streamed comparison without --data-file (written for qconvert: any plain
# English prose serves; it must run to more tokens than the default --tokens 128)
SAMPLE_TEXT = (
    "The ferry left the north bank a little after seven, as it had every morning for forty years. "
    "Most of the passengers were regulars: a baker with two crates of bread for the market, three "
    "students who read their notes aloud to each other, and an old man who fed the gulls from a paper "
    "bag although the sign by the rail asked him not to. The river was wide here, and slow, and in "
    "winter the fog sat on it so thickly that the pilot steered by the sound of the bell on the far "
    "pier. Nobody on board could remember a crossing that had gone wrong. When the bridge upstream was "
    "finished, the town council argued for a whole season about whether the ferry should keep running. "
    "The engineers said the bridge would carry ten times as many people in half the time, and they were "
    "right. The baker said that he did not want to spend his mornings in a queue of cars, and the "
    "students said that twenty minutes on the water was the only quiet part of their day. In the end "
    "the council kept the ferry for one more year, then another, and then stopped discussing it at all. "
    "It still crosses twice an hour. The timetable is painted on a board beside the ticket window, and "
    "the paint has been renewed so often that the numbers stand out from the wood like carved letters. "
    "On clear evenings the last boat carries more tourists than townspeople, and the pilot, who is the "
    "granddaughter of the first one, points out the heron that nests under the old customs house."
)


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
    sample: str | None = None  # where the sample text came from
    streamed: bool = False  # the source ran one decoder block at a time (it did not fit in memory)
    serving: list = field(default_factory=list)  # with --target: what vLLM would do with each layer
    made_on: str | None = None  # the device that calibrated OUT: qconvert.json's "device", "cpu" when absent
    removed_stale: bool = False  # this failing run removed an earlier passing OUT/verify.json
    kept_comparison: str | None = None  # this run compared nothing: the earlier passing report's comparison (with this source) is kept
    kept_earlier: str | None = None  # why the earlier passing OUT/verify.json stays (a failure that is not OUT's own)

    def __post_init__(self):
        if self.made_on is None:
            try:
                self.made_on = json.loads((Path(self.out) / "qconvert.json").read_text()).get("device", "cpu")
            except (OSError, ValueError, AttributeError):
                pass

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
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") not in READ_VERSIONS:
        _fail(rep, f"{MANIFEST} declares format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
                   f"not {FORMAT_NAME} {' or '.join(map(str, READ_VERSIONS))}")
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


def check_tensors(out: Path, rep: VerifyReport):
    """Returns (config, qc) when the structure holds, else None (failures recorded)."""
    from qconvert.formats.safetensors_io import ShardedReader
    from qconvert.runtime import model_config
    from qconvert.skeleton import build_skeleton

    cfg, qc = read_quant_config(out)
    config = model_config(out, cfg)
    reader = ShardedReader(out)
    params = dict(build_skeleton(config).named_parameters())
    modules = qc.get("modules")
    if not isinstance(modules, dict):
        _fail(rep, "config.json: quantization_config lacks 'modules'")
        return None
    taken = set()
    for mod, layout in modules.items():
        taken |= _check_layer(rep, reader, mod, layout, qc, params)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, p in params.items():
        if name in taken or name.rsplit(".", 1)[0] in modules or (tied and name == "lm_head.weight"):
            continue
        _check_shape(rep, reader, name, tuple(p.shape))
        taken.add(name)
    extra = sorted(set(reader.keys()) - taken)
    if extra:
        _fail(rep, f"tensor {extra[0]} does not belong to the model ({len(extra)} such)")
    from qconvert.multimodal import check_carried

    carried = check_carried(out)
    if carried:
        _fail(rep, carried)
    try:
        report = json.loads((out / "qconvert.json").read_text())
        names = [r["name"] for r in report["layers"]]
        if sorted(names) != sorted(modules):
            _fail(rep, "qconvert.json and config.json list different quantized layers")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        _fail(rep, f"qconvert.json is missing or malformed ({e})")
    return None if rep.failures else (config, qc)


def _check_shape(rep: VerifyReport, reader, name: str, shape: tuple) -> None:
    """An unquantized tensor (or a bias, kept in the source's dtype): present, of the config's shape."""
    if name not in reader.where:
        _fail(rep, f"tensor {name} is missing")
    elif tuple(reader.info(name).shape) != shape:
        _fail(rep, f"tensor {name} has shape {list(reader.info(name).shape)}, the config implies {list(shape)}")
    else:
        rep.checked_tensors += 1


def _check_layer(rep: VerifyReport, reader, mod: str, layout: str, qc: dict, params: dict) -> set[str]:
    """One quantized linear against its layout's spec and checks; returns the tensor names it owns."""
    from qconvert.layouts.base import shape_check
    from qconvert.runtime import stored_layer

    try:
        layer = stored_layer(mod, layout, qc, params, reader)
    except QConvertError as e:
        _fail(rep, str(e))
        return set()
    owned = set(layer.tensor_names())
    problems = layer.problems(reader)
    for p in problems:
        _fail(rep, p)
    rep.checked_tensors += len(layer.spec) - len(problems)
    if not problems:  # the values, once every tensor has its declared dtype and shape
        for p in layer.layout.check(mod, layer.tensors(reader), layer.n, layer.k, **layer.params):
            _fail(rep, p)
    elif "shape" in layer.spec and not any(f"{mod}.shape " in p for p in problems):
        for p in shape_check(mod, {"shape": reader.get(f"{mod}.shape")}, layer.n, layer.k):
            _fail(rep, p)  # the stored true shape says where the config and the tensors part
    if f"{mod}.bias" in params:
        _check_shape(rep, reader, f"{mod}.bias", (layer.n,))
        owned.add(f"{mod}.bias")
    return owned


def recorded_source(out: Path) -> str | None:
    """The SOURCE an OUT was made from, as its report records it (None if it cannot tell)."""
    from qconvert.source import source_spec

    try:
        return source_spec(json.loads((out / "qconvert.json").read_text()))
    except (OSError, json.JSONDecodeError, TypeError, AttributeError):
        return None


def _read_recorded_source(out: Path, rep: VerifyReport) -> tuple[str | None, object, int]:
    """(the SOURCE OUT records, it resolved, 0) where it can be read here; (None, None, 0) where none is
    recorded; (spec, None, 1) and a failure in ``rep`` that names it and the way out where it cannot
    (moved, deleted, not in the Hub cache): not a fault of OUT's."""
    from qconvert.source import resolve_source

    spec = recorded_source(out)
    if spec is None:
        return None, None, 0
    try:
        return spec, resolve_source(spec), 0
    except QConvertError as e:
        _fail(rep, f"the source OUT was made from ({spec}, recorded in qconvert.json) cannot be read here ({e}); "
                   "pass --against SOURCE to compare with it where it is now, or --no-compare to check the files only")
        return spec, None, 1


def rotated_as_recorded(out: Path, src):
    """``src`` rotated as the OUT's report says it was before quantization (``quantize --rotate``),
    so that per-layer comparisons feed each quantized linear the inputs it was made for; the
    source itself when the OUT was not rotated."""
    try:
        rotation = json.loads((Path(out) / "qconvert.json").read_text()).get("rotation")
    except (OSError, json.JSONDecodeError, AttributeError):
        rotation = None
    if not rotation:
        return src
    from qconvert.solvers.rotation import RotatedSource

    return RotatedSource(src, rotation["mode"], rotation["seed"], online="online" in rotation)


def _sample_ids(ref, tokenizer, data_file, n_tokens: int, what: str) -> tuple[torch.Tensor, str]:
    """The sample's token ids [1, n] and where they came from: ``data_file``; else, with the
    source model at hand (``ref``), text it writes; else (a streamed source) ``SAMPLE_TEXT``."""
    if data_file is None and ref is not None:
        start = ref.config.bos_token_id if ref.config.bos_token_id is not None else 0
        torch.manual_seed(0)
        ids = ref.generate(torch.tensor([[start]]), do_sample=True, top_k=50, max_new_tokens=n_tokens - 1,
                           min_new_tokens=n_tokens - 1, pad_token_id=start)
        return ids, "text the source wrote"
    if tokenizer is None and data_file is not None:
        raise QConvertError(f"{what} has no tokenizer to read {data_file}; verify without --data-file")
    if tokenizer is None:
        raise QConvertError(f"{what} has no tokenizer, which a streamed comparison needs to read its sample text; "
                            "verify with --no-stream (the source then writes its own) or --no-compare")
    if data_file is not None:
        from qconvert.calibration_text import read_text_file

        text, sample = read_text_file(Path(data_file)), str(data_file)
    else:
        text, sample = SAMPLE_TEXT, "qconvert's built-in passage (the source was streamed)"
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < 2:
        raise QConvertError(f"{data_file} holds fewer than 2 tokens; give a longer sample")
    return ids, sample


def source_float_bytes(src) -> int:
    """Bytes of the source's tensors in float32 (what the unstreamed comparison holds of it)."""
    return 4 * sum(math.prod(src.info(name)[1]) for name in src.keys())


def too_large_to_hold(src) -> bool:
    """Whether ``compare`` streams ``src`` by default: its float32 tensors take more than half
    the available RAM (the rest is for the quantized model and the activations)."""
    from qconvert.placement import available_ram

    return source_float_bytes(src) > available_ram() // 2


@torch.inference_mode()
def streamed_reference(src, ids: torch.Tensor, watch: set[str], on_block) -> torch.Tensor:
    """The source model's logits [n, V] for ``ids`` [1, n], computed with one decoder block in
    memory at a time besides the embedding, the final norm and the head (each read only for
    its turn): block i is read from ``src`` in float32, the hidden states run through it, and
    it is dropped.  ``on_block({name: (input, output)})`` receives, after each block (and after
    the head), what its linears named in ``watch`` read and wrote."""
    import tempfile

    from qconvert.architectures import DECODER_LAYERS
    from qconvert.block_walk import Calibrator
    from qconvert.pipeline import plan_tensors
    from qconvert.skeleton import build_skeleton, target_linears

    skeleton = build_skeleton(src.config)
    names, _ = plan_tensors(src, skeleton, target_linears(skeleton, ()))
    where = {id(m): n for n, m in skeleton.named_modules()}
    trunk = skeleton.get_submodule(DECODER_LAYERS.rsplit(".", 1)[0])
    norm, head = getattr(trunk, "norm", None), skeleton.get_output_embeddings()
    if norm is None or head is None:
        raise QConvertError(f"{type(skeleton).__name__} has no final norm and head where verify looks; verify with "
                            "--no-stream on a machine that holds the source in memory")
    with tempfile.TemporaryDirectory(prefix="qconvert-verify-") as tmp:
        cal = Calibrator(src, skeleton, names, ids, Path(tmp), max_memory=1 << 62, progress=False, on_disk=False)
        try:
            cal.embed()
        except QConvertError as e:  # its advice is about quantize's options
            raise QConvertError(f"verify cannot stream {type(skeleton).__name__} ({str(e).split(';')[0]}); "
                                "verify with --no-stream on a machine that holds the source in memory") from None
        for i in range(len(cal.layers)):
            block, caught = cal.load_block(i), {}
            hooks = _catch_linears(block, f"{DECODER_LAYERS}.{i}", watch, caught)
            try:
                for sl, kwargs in cal._batches(i):
                    y = block(cal.acts.inputs[sl], **kwargs)
                    cal.acts.outputs[sl] = y[0] if isinstance(y, tuple) else y
            finally:
                for h in hooks:
                    h.remove()
                cal.release_block(block)
            on_block(caught)
            cal.acts.swap()
        caught = {}
        hooks = _catch_linears(head, where[id(head)], watch, caught)  # a quantized head (--quantize-lm-head)
        try:
            cal.materialize(norm, where[id(norm)] + ".")
            cal.materialize(head, where[id(head)] + ".")
            logits = head(norm(cal.acts.inputs))[0].float()
        finally:
            for h in hooks:
                h.remove()
            cal.unload(norm)
            cal.unload(head)
        on_block(caught)
        return logits


def _catch_linears(root, root_name: str, watch: set[str], caught: dict) -> list:
    """Hooks that keep, in ``caught[name]``, the input and output of each module under ``root``
    named in ``watch``: the input as it arrives, before the pre-hook of an online transform
    (``--rotate hadamard+online``), which the quantized twin applies itself."""
    hooks = []
    for n, m in root.named_modules():
        name = ".".join(part for part in (root_name, n) if part)
        if name in watch:
            hooks += [m.register_forward_pre_hook(lambda m, a, name=name: caught.__setitem__(name, [a[0]]), prepend=True),
                      m.register_forward_hook(lambda m, a, y, name=name: caught[name].append(y))]
    return hooks


def _layer_snrs(qmods: dict, caught: dict, rep: VerifyReport) -> None:
    """Each caught linear's output SNR (dB) against its quantized twin on the same input."""
    for name, (x, y) in caught.items():
        err = (qmods[name](x).float() - y.float()).square().sum()
        snr = 10 * math.log10(float(y.float().square().sum()) / max(float(err), 1e-30))
        rep.layers.append({"name": name, "snr_db": round(snr, 2)})


@torch.inference_mode()
def compare(out: Path, against, rep: VerifyReport, data_file=None, n_tokens: int = 128,
            stream: bool | None = None, announce=None, label: str | None = None) -> None:
    """Per-layer SNR, KL and top-1 agreement of OUT against ``against`` (a SOURCE or a Source);
    ``stream``: run the source one block at a time (default: when ``too_large_to_hold``);
    ``announce``: called with a line as each slow stage starts (the CLI's progress)."""
    say = announce or (lambda line: None)
    from torch import nn

    from qconvert.layouts import QuantizedModule
    from qconvert.runtime import load
    from qconvert.source import Source, resolve_source

    src = rotated_as_recorded(out, against if isinstance(against, Source) else resolve_source(against))
    what = label or getattr(against, "description", str(against))
    from qconvert.multimodal import compare_carried

    carried = compare_carried(out, src)  # a multimodal checkpoint's image parts, kept bit for bit
    if carried:
        _fail(rep, carried)
    rep.streamed = too_large_to_hold(src) if stream is None else bool(stream)
    say(f"comparing with {what}: loading OUT and the source"
        + (" (streamed: one decoder block at a time)" if rep.streamed else ""))
    model = load(out, dtype=torch.float32)
    tok = src.load_tokenizer()
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedModule)}
    if rep.streamed:
        ids, rep.sample = _sample_ids(None, tok, data_file, n_tokens, what)
        ref_logits = streamed_reference(src, ids, set(qmods), lambda caught: _layer_snrs(qmods, caught, rep))
    else:
        ref = src.load_model(torch.float32)
        if data_file is None:
            say(f"the source writes a {n_tokens}-token sample (--data-file gives one instead)")
        ids, rep.sample = _sample_ids(ref, tok, data_file, n_tokens, what)
        say("running the source on it, layer outputs caught")
        caught = {}
        linears = {n for n, m in ref.named_modules() if n in qmods and isinstance(m, nn.Linear)}
        hooks = _catch_linears(ref, "", linears, caught)
        ref_logits = ref(ids).logits[0].float()
        for h in hooks:
            h.remove()
        del ref
        _layer_snrs(qmods, caught, rep)
    rep.against, rep.sample_tokens = what, int(ids.shape[1])
    say("running OUT on it")
    q_logits = model(ids).logits[0].float()
    logp, logq = ref_logits.log_softmax(-1), q_logits.log_softmax(-1)
    rep.kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    rep.top1_agreement = float((ref_logits.argmax(-1) == q_logits.argmax(-1)).float().mean())
    rep.min_snr_db = min((r["snr_db"] for r in rep.layers), default=None)


def verify(out, against: str | None = None, data_file=None, n_tokens: int = 128, compare_source: bool = True,
           min_snr_db: float = 5.0, min_top1: float = 0.3, save: bool = True, target: str | None = None,
           tensor_parallel: int = 1, stream: bool | None = None, announce=None) -> VerifyReport:
    """Check OUT; never raises for a damaged OUT (failures are in the report).  ``target``
    (vllm[:cpu|:sm80|:sm89|:sm90]) also checks that the engine would serve its export at
    ``tensor_parallel`` ranks (qconvert/serving.py).  ``stream``: see ``compare``."""
    out = Path(out)
    if data_file is not None and compare_source and not Path(data_file).is_file():  # before any model is read
        raise QConvertError(f"data file {data_file} not found; pass an existing text file with --data-file, or none")
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
    not_own = 0  # failures that are not of OUT itself (its recorded source missing here, a serving target)
    if structure is not None and compare_source:
        label = against if isinstance(against, str) else None  # a Source passed in: its description
        if against is None:
            label, against, not_own = _read_recorded_source(out, rep)
        if against is not None:
            compare(out, against, rep, data_file, n_tokens, stream, announce, label)
            low = [r for r in rep.layers if r["snr_db"] < min_snr_db]
            if low:
                _fail(rep, f"{len(low)} layers below {min_snr_db} dB SNR, worst {low[0]['name']} ({min(r['snr_db'] for r in low)} dB)")
            if rep.top1_agreement is not None and rep.top1_agreement < min_top1:
                _fail(rep, f"top-1 agreement {rep.top1_agreement:.3f} is below {min_top1}")
    own_failures = len(rep.failures) - not_own  # the OUT's own checks; a serving target's come after
    if structure is not None and target:
        _check_serving(out, rep, target, tensor_parallel)
    if save:
        why = ("its recorded source cannot be read here" if not_own else "only the --target check failed")
        _save_report(out, rep, own_failures, why)
    return rep


COMPARISON = ("against", "sample_tokens", "layers", "min_snr_db", "kl", "top1_agreement", "sample", "streamed")


def _save_report(out: Path, rep: VerifyReport, own_failures: int, why_kept: str) -> None:
    """OUT/verify.json (the card's source): a pass writes it, keeping an earlier pass's comparison
    when this run compared nothing (the files passed their sha256, so it is of the same tensors); a
    failure of the OUT's own checks removes an earlier pass (it no longer holds); a failure of the
    serving target alone leaves it (the OUT did not change)."""
    path = out / VERIFY_FILE
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        earlier = None
    if rep.ok:
        record = rep.to_dict()
        if rep.against is None and isinstance(earlier, dict) and earlier.get("ok") and earlier.get("against"):
            record.update({k: earlier.get(k) for k in COMPARISON})
            record["kept_comparison"] = rep.kept_comparison = earlier["against"]
        path.write_text(json.dumps(record, indent=2) + "\n")
    elif earlier is not None and own_failures == 0:
        rep.kept_earlier = why_kept
    elif path.exists():  # an earlier pass no longer holds (or an unreadable file): the card must not claim it
        path.unlink()
        rep.removed_stale = True


def _check_serving(out: Path, rep: VerifyReport, target: str, tensor_parallel: int) -> None:
    from dataclasses import asdict

    from qconvert.formats.compressed_tensors import serving_check

    try:
        findings = serving_check(out, target, tensor_parallel)
    except QConvertError as e:
        _fail(rep, f"{target}: {e}")
        return
    rep.serving = [asdict(f) for f in findings]
