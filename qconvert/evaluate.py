"""Perplexity on non-overlapping windows, the same for an original SOURCE and an OUT."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qconvert.errors import QConvertError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    seqlen: int
    tokens: int  # tokens in the text
    scored_tokens: int = 0  # tokens predicted and scored: windows x (seqlen - 1)

    def to_dict(self):
        return asdict(self)


def load_model_and_tokenizer(target: str, dtype: torch.dtype = torch.float32, device: str = "cpu", integer: bool = True):
    """An OUT directory through ``qconvert.load``; a compressed-tensors export of one (``qconvert
    export``) through transformers, as its users run it; anything else as a SOURCE, unquantized;
    on ``device`` ("cuda": the OUT's kernels, the others moved there)."""
    from qconvert.formats.native import is_native
    from qconvert.hub import is_export

    if is_export(target):
        return _load_export(target, dtype, device), _tokenizer(target), "compressed-tensors"
    if is_native(target):
        from qconvert.runtime import load

        model = load(target, device=device, dtype=dtype, integer=integer)
        return model, _tokenizer(target), "qconvert"
    from qconvert.source import resolve_source

    src = resolve_source(target)
    tok = src.load_tokenizer()
    if tok is None:
        raise QConvertError(f"{target} has no tokenizer files; it cannot read or write text")
    return src.load_model(dtype).to(device), tok, src.kind


def load_where_asked(target: str, device: str | None, command: str, note=None):
    """``(model, tokenizer, kind, device, dtype)`` of TARGET on ``--device`` of ``command`` (eval,
    generate): None is a GPU where one is usable, else the CPU.  When the GPU was only the default and
    TARGET cannot run there (``NoKernel``: FP8 layers on a GPU older than sm_89, a shape no kernel
    takes; or it does not fit in the GPU's memory), ``note`` (default: stderr) says why and it runs on
    the CPU, as before the GPU default; a GPU asked for by name is not replaced."""
    import sys

    from qconvert.bench import compute_dtype, resolve_device
    from qconvert.errors import NoKernel, first_line

    dev = resolve_device(device, command)
    dtype = compute_dtype(dev)
    try:
        return (*load_model_and_tokenizer(target, dtype=dtype, device=str(dev)), dev, dtype)
    except (NoKernel, torch.cuda.OutOfMemoryError) as e:
        if device is not None or dev.type == "cpu":
            raise
        why = first_line(e) if isinstance(e, NoKernel) else f"{target} does not fit in the GPU's memory"
    torch.cuda.empty_cache()
    (note or (lambda line: print(f"Note: {line}.", file=sys.stderr)))(
        f"{why}; running on the CPU instead (pass --device cpu to skip the GPU, or --device cuda to make this an error)")
    return (*load_model_and_tokenizer(target, dtype=torch.float32, device="cpu"), torch.device("cpu"), torch.float32)


def _tokenizer(target: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError) as e:
        raise QConvertError(f"{target} has no usable tokenizer ({e}); re-quantize from a source that has one") from e


def _load_export(target: str, dtype: torch.dtype, device: str):
    """The export as transformers builds it with compressed-tensors (what a transformers user of
    it runs: the weights decompressed at the first forward, int8 activations quantized per token
    where the scheme says so)."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise QConvertError(f"{target} is a compressed-tensors export, which transformers reads with the "
                            'compressed-tensors package: pip install "qconvert[export]"') from None
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from qconvert.multimodal import FAMILIES, transformers_cannot_load

    try:  # a multimodal export runs as its multimodal class (Mistral-3 has no causal-LM one)
        model_type = json.loads((Path(target) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    why = transformers_cannot_load(model_type)
    if why:
        raise QConvertError(f"{target}: {why}; evaluate the OUT it was exported from (the same weights), "
                            "or serve the export with vLLM")
    auto = AutoModelForImageTextToText if model_type in FAMILIES else AutoModelForCausalLM
    try:
        model, info = auto.from_pretrained(target, dtype=dtype, output_loading_info=True)
    except RuntimeError:
        if not _asymmetric_weights(target):
            raise
        raise QConvertError(
            f"{target}: transformers {transformers.__version__} with compressed-tensors {compressed_tensors.__version__} "
            "cannot load asymmetric pack-quantized weights (it expects the zero points unpacked; vLLM reads them as "
            "written, docs/export.md); evaluate the OUT it was exported from (the same weights)") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would run them as freshly initialized weights: a score of another model
        raise QConvertError(f"{target}: transformers builds {len(missing)} weights the export does not hold, e.g. "
                            f"'{missing[0]}'; evaluate the OUT it was exported from (the same weights)")
    return model.to(device).eval()


def _asymmetric_weights(target: str) -> bool:
    """Whether an export's config.json has a scheme with zero points (``weights.symmetric`` false)."""
    try:
        qc = json.loads((Path(target) / "config.json").read_text())["quantization_config"]
        return any(not (g.get("weights") or {}).get("symmetric", True) for g in qc["config_groups"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def model_device(model) -> torch.device:
    """Where ``model`` computes: its ``device`` (transformers' models, the integer-only one), else its
    first parameter's, else the CPU."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def runtime_label(model, dtype: torch.dtype) -> dict:
    """What a score was computed on, kept with it: the device type, the GPU's name, and the float dtype
    (``integer-only`` for I-LLM's integer model).  Scores from before ``eval --device`` have none of it:
    they ran on the CPU in float32."""
    dev = model_device(model)
    label = {"device": dev.type,
             "dtype": "integer-only" if hasattr(model, "decode_engine") else str(dtype).removeprefix("torch.")}
    if dev.type == "cuda":
        label["device_name"] = torch.cuda.get_device_name(dev)
    return label


def row_device(row: dict) -> str:
    """The device type of a saved eval row (rows saved before ``--device`` ran on the CPU)."""
    return str(row.get("device") or "cpu")


def save_result(out: Path, record: dict) -> None:
    """Keep ``record`` in OUT/eval.json for the model card: one entry per (dataset, seqlen, windows,
    device type); every target by its directory's name (the file is pushed with OUT: no local path)."""
    from qconvert.hub import public_evals

    path = Path(out) / "eval.json"
    try:
        saved = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError:
        saved = []
    saved = saved if isinstance(saved, list) else [saved]
    key = (record["dataset"], record["seqlen"], record["windows"], row_device(record))
    saved = [r for r in saved
             if isinstance(r, dict) and (r.get("dataset"), r.get("seqlen"), r.get("windows"), row_device(r)) != key]
    path.write_text(json.dumps(public_evals(saved + [{**record, "target": record.get("target", str(out))}]),
                               indent=2) + "\n")


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> PerplexityResult:
    """exp(mean NLL) over ``min(n_tokens // seqlen, max_windows)`` consecutive windows."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if ids.numel() == 0:
        raise QConvertError("the text is empty (0 tokens); pass a file with text in it")
    if n < 1:
        raise QConvertError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    total = 0.0
    device = model_device(model)
    for i in tqdm(range(n), desc="eval", unit="window", disable=not progress):
        window = ids[i * seqlen : (i + 1) * seqlen][None].to(device)
        logits = model(window).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    nll = total / (n * (seqlen - 1))
    if not math.isfinite(nll):
        raise QConvertError(f"the mean NLL is {nll} on {device.type}: the model overflowed in its float dtype"
                            + ("; evaluate with --device cpu (float32)" if device.type != "cpu" else ""))
    return PerplexityResult(math.exp(nll), nll, n, seqlen, int(ids.numel()), n * (seqlen - 1))
