"""Load a native OUT into a torch model whose quantized linears run the kernels' arithmetic.

Every quantized linear is built by its layout (qconvert/layouts/): on CPU the layout's runtime
module runs the exact torch reference of its kernel, on a CUDA device (``load(OUT,
device="cuda")``) the CUDA kernels.  A layout may bring a whole-model runtime instead of
transformers' (I-LLM's integer-only model); ``integer=False`` then gives the float model with
the same quantized linears.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qconvert.errors import QConvertError, first_line
from qconvert.formats.native import read_quant_config
from qconvert.formats.safetensors_io import ShardedReader
from qconvert.layouts import Layout, QuantizedModule, TensorSpec, get_layout
from qconvert.mlp import use_swiglu_kernels
from qconvert.norms import use_norm_kernels
from qconvert.rope import use_rope_kernels
from qconvert.skeleton import build_skeleton


@dataclass
class StoredLayer:
    """One quantized linear of an OUT: its layout, true shape [N, K], parameters and tensor spec."""

    name: str
    layout: Layout
    n: int
    k: int
    params: dict
    spec: dict[str, TensorSpec]

    def tensor_names(self) -> list[str]:
        return [f"{self.name}.{s}" for s in self.spec]

    def problems(self, reader) -> list[str]:
        """Tensors missing or of another dtype / shape than the spec (header reads only)."""
        out = []
        for suffix, want in self.spec.items():
            full = f"{self.name}.{suffix}"
            if full not in reader.where:
                out.append(f"tensor {full} is missing")
                continue
            info = reader.info(full)
            if info.dtype != want.dtype or tuple(info.shape) != tuple(want.shape):
                out.append(f"tensor {full} is {info.dtype} {list(info.shape)}, the format declares "
                           f"{want.dtype} {list(want.shape)}")
        return out

    def tensors(self, reader) -> dict[str, torch.Tensor]:
        return {s: reader.get(f"{self.name}.{s}") for s in self.spec}


def stored_layer(name: str, layout_name: str, qc: dict, params: dict[str, torch.Tensor], reader) -> StoredLayer:
    """What the registry says of quantized linear ``name`` (``params``: the skeleton's parameters)."""
    layout = get_layout(layout_name, where=name)
    w = params.get(f"{name}.weight")
    if w is None:
        raise QConvertError(f"{name} is not a linear layer of this model's config")
    n, k = w.shape

    def shape_of(suffix):
        full = f"{name}.{suffix}"
        return tuple(reader.info(full).shape) if full in reader.where else None

    p = layout.params(qc.get("config") or {}, shape_of)
    return StoredLayer(name, layout, n, k, p, layout.spec(n, k, **p))


def model_config(out: Path, cfg: dict):
    """The transformers config of an OUT's config.json (quantization_config removed)."""
    from transformers import AutoConfig

    from qconvert.architectures import check_architecture

    cfg = dict(cfg)
    model_type = cfg.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise QConvertError(f"{out}/config.json is not a usable model config ({e}); re-run qconvert quantize") from e
    check_architecture(config)
    return config


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


GLUE = ("norm", "rope", "swiglu")  # the float glue that runs on kernels, each with its switch


def use_glue_kernels(model: nn.Module, device: torch.device | str, glue=GLUE) -> None:
    """The float glue of ``glue`` runs on its kernels for inputs on ``device`` (a GPU; the CPU only
    under the kernel emulators): "norm" the RMSNorms (``qconvert.norms``), "rope" the attention
    layers' RoPE (``qconvert.rope``), "swiglu" the MLPs' silu(gate) * up (``qconvert.mlp``).
    Setting a module again changes nothing."""
    setters = {"norm": use_norm_kernels, "rope": use_rope_kernels, "swiglu": use_swiglu_kernels}
    unknown = set(glue) - set(setters)
    if unknown:
        raise ValueError(f"unknown glue {sorted(unknown)}; known: {', '.join(GLUE)}")
    for name in GLUE:
        if name in glue:
            setters[name](model, device)


def _stored_float(reader, taken: set) -> torch.dtype | None:
    """The dtype of the first float tensor outside the quantized linears (the embedding, a norm)."""
    floats = (reader.info(name).dtype for name in reader.keys() if name not in taken)
    return next((dt for dt in floats if dt.is_floating_point), None)


def load(out: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, integer: bool = True,
         fuse: bool = True, norm_kernels: bool = True, rope_kernels: bool = True, swiglu_kernels: bool = True):
    """Load a native qconvert OUT as a ready-to-run ``transformers`` causal LM.

    ``dtype`` casts the unquantized tensors (embeddings, norms, lm_head): torch.float16, torch.bfloat16
    or torch.float32, or its name ("auto" or None: the default); default: as stored
    on CPU, float32 where that is float16 (a GGUF file's OUT: CPUs have no float16 arithmetic
    worth the rounding), float16 on CUDA (the kernels take fp16 / bf16 activations).  ``device`` "cpu" runs
    the exact reference; "cuda" / "cuda:N" the CUDA kernels (cupy and an sm_80+ GPU needed).
    An OUT whose layout brings a whole-model runtime (I-LLM) loads as that model (with
    transformers' ``generate``, greedy or temperature sampling, and ``labels=`` for a loss); with
    ``integer=False`` as the float model with the same quantized linears instead (a diagnostic
    that separates what the integer-only glue costs from what the W/A quantization costs).
    On CUDA, sibling linears that read the same input (q/k/v, gate/up) run as one GEMM where
    their layout can (``fuse_siblings``; the same outputs); ``fuse=False`` keeps one per linear.
    On CUDA the Llama-family RMSNorms run one kernel each (``qconvert.norms.use_norm_kernels``:
    transformers' formula in a fixed order; a few outputs a unit in the last place apart);
    ``norm_kernels=False`` keeps transformers' eight torch ops per norm.  On CUDA the Llama-family
    attention layers rotate q and k in one kernel (``qconvert.rope.use_rope_kernels``: transformers'
    formula bit for bit); ``rope_kernels=False`` keeps its ten torch ops per block.  On CUDA the
    Llama-family MLPs compute silu(gate) * up in one kernel (``qconvert.mlp.use_swiglu_kernels``:
    torch's two ops step for step, CUDA's expf included); ``swiglu_kernels=False`` keeps them.
    (The decode engine writes the KV cache in one kernel a block on such a GPU: ``DecodeEngine``'s
    ``cache_kernel``.)
    """
    out = Path(out)
    dev = _device(device)
    dtype = _load_dtype(dtype)
    if dev.type == "cuda" and dtype is None:
        dtype = torch.float16
    cfg, qc = read_quant_config(out)
    config = model_config(out, cfg)
    reader = ShardedReader(out)
    model = build_skeleton(config)
    layers = [stored_layer(n, lay, qc, dict(model.named_parameters()), reader) for n, lay in qc["modules"].items()]
    taken = {t for layer in layers for t in layer.tensor_names()} | {f"{layer.name}.bias" for layer in layers}
    if dtype is None and dev.type == "cpu" and _stored_float(reader, taken) == torch.float16:
        dtype = torch.float32  # a float16 OUT (of a GGUF file) computes in float32 on a CPU, as the CLI does there
    modules = _build_modules(out, layers, reader, dtype)
    runtimes = {layer.layout.model_runtime for layer in layers} - {None}
    whole_model = bool(runtimes) and integer
    if whole_model and (len(runtimes) > 1 or any(layer.layout.model_runtime is None for layer in layers)):
        raise QConvertError(f"{out} mixes layouts with and without their own model runtime; re-run quantize")
    # a whole-model runtime takes the stored tensors as they are and makes its own constants from them
    # (I-LLM: integers), whatever dtype the float model would compute in (float16 on CUDA)
    cast = dtype if not whole_model else None
    state = {}
    for name in reader.keys():
        if name not in taken:
            t = reader.get(name)
            state[name] = t.to(cast) if cast is not None and t.is_floating_point() else t
    if whole_model:
        whole = runtimes.pop()(out, config, modules, state, dev)
        _attach_online(out, whole, qc.get("online_rotation"))  # the runtime reads it from down_proj
        _generation_config(out, whole)
        return _refuse_saving(whole, out)
    for name, module in modules.items():
        module.inside_stored_model()
        set_module(model, name, module)
    _fill(out, model, config, state)
    _attach_online(out, model, qc.get("online_rotation"))
    _generation_config(out, model)
    if dev.type == "cuda":
        for name, module in modules.items():
            module.check_cuda(name)
        if fuse:
            fuse_siblings(model)
        for module in modules.values():
            # a layout that keeps its stored tensors on the host (W4A8: the kernels read only the
            # repacked copy) repacks from them straight to the GPU, so the move below takes the rest
            # and the GPU holds the weights once
            if type(module).keep_stored_on_host is not QuantizedModule.keep_stored_on_host:
                module.prepare_cuda(dev)
                module.keep_stored_on_host()
        model.to(dev)
        for module in modules.values():
            module.prepare_cuda()  # the others (plugins too) once on the GPU; it may synchronize: here, once
        use_glue_kernels(model, dev, [g for g, on in zip(GLUE, (norm_kernels, rope_kernels, swiglu_kernels)) if on])
    return _refuse_saving(model, out).eval()


def _generation_config(out: Path, model) -> None:
    """The source's generation_config.json (copied into OUT) as the model's ``generation_config``, as
    ``from_pretrained`` reads it: its EOS ids (Llama-3-Instruct's ``<|eot_id|>`` is only there), length
    and sampling defaults.  Without the file the model keeps the one made from config.json."""
    path = out / "generation_config.json"
    if not path.is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(out)
    except (OSError, ValueError, TypeError) as e:
        raise QConvertError(f"{path} is not a valid generation config ({first_line(e)}); "
                            "delete it to use config.json's defaults, or copy the source's file again") from e


def _load_dtype(dtype):
    """``load``'s dtype: a float torch.dtype, its name as transformers' ``from_pretrained`` takes it, or
    None / "auto" (the default rule)."""
    from qconvert.formats.safetensors_io import FLOAT_DTYPES

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES.values():
        return dtype
    raise QConvertError(f"load(dtype={dtype!r}): give torch.float16, torch.bfloat16 or torch.float32, its name, "
                        "or 'auto' (as stored; float16 on CUDA)")


def _refuse_saving(model, out: Path):
    """transformers' save_pretrained / push_to_hub on a loaded OUT would write the runtime's buffers
    under the linears' names with no quantization config: a checkpoint that loads as random weights.
    They raise instead, saying what to use."""
    import functools

    for name in ("save_pretrained", "push_to_hub"):
        if hasattr(model, name):
            setattr(model, name, functools.partial(_refuse_save, str(out)))  # a partial pickles; a closure would not
    return model


def _refuse_save(out: str, *args, **kwargs):
    raise QConvertError(
        f"a model made by qconvert.load cannot be written with save_pretrained / push_to_hub (it would hold "
        f"runtime buffers and no quantization config): the OUT folder {out} is the checkpoint (copy it, or "
        f"`qconvert push {out} REPO`), and `qconvert export {out} --format compressed-tensors -o DIR` writes "
        "one that transformers and vLLM load")


# linears of one parent that read the same input in the supported architectures (Llama, Mistral,
# Qwen2/3 attention and MLP; Mixtral's experts: w1 = gate, w3 = up)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def fuse_siblings(model: nn.Module) -> list[str]:
    """Let sibling quantized linears that read the same input run as one GEMM where their
    layout can (``QuantizedModule.fuse``: W4A8 on the GPU, qconvert/layouts/int4.py ``SiblingGEMM``;
    ZeroQuant-FP, qconvert/layouts/fp8.py ``FP8Siblings``); returns the fused groups' names ("model.layers.0.self_attn.q_proj+k_proj+v_proj")."""
    fused = []
    for pname, parent in model.named_modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, QuantizedModule) for m in members) and type(members[0]).fuse(members):
                fused.append(f"{pname}.{'+'.join(names)}".lstrip("."))
    return fused


def _build_modules(out: Path, layers: list[StoredLayer], reader, dtype) -> dict[str, QuantizedModule]:
    modules = {}
    for layer in layers:
        problems = layer.problems(reader)
        if problems:
            raise QConvertError(f"{out}: {problems[0]}; the output is incomplete or damaged, re-run quantize "
                                "(`qconvert verify` lists every problem)")
        bias_name = f"{layer.name}.bias"
        bias = reader.get(bias_name) if bias_name in reader.where else None
        if bias is not None and dtype is not None:
            bias = bias.to(dtype)
        modules[layer.name] = layer.layout.module(layer.tensors(reader), bias, **layer.params)
    return modules


def _fill(out: Path, model: nn.Module, config, state: dict) -> None:
    """The unquantized tensors into the skeleton (tying a tied head), every parameter accounted for."""
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise QConvertError(f"{out}: tensor '{result.unexpected_keys[0]}' does not belong to this model's config")
    if config.tie_word_embeddings and isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head.weight = model.get_input_embeddings().weight
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise QConvertError(f"{out}: no tensor for '{still_meta[0]}'; the output is incomplete, re-run quantize")


def _attach_online(out: Path, model: nn.Module, spec: dict | None) -> None:
    """``--rotate hadamard+online``: the listed linears (quantized or not) transform their input
    first (qconvert/online_hadamard.py), as the OUT's weights expect."""
    if not spec:
        return
    from qconvert.online_hadamard import KIND, OnlineHadamard, attach_all

    names = spec.get("modules") or []
    if spec.get("kind") != KIND or not isinstance(spec.get("order"), int) or not names:
        raise QConvertError(f"{out}/config.json: online_rotation {spec!r} is not one qconvert knows; re-run quantize")
    transform = OnlineHadamard(spec["order"])
    if (transform.m, 1 << transform.lp) != (spec.get("m"), spec.get("p")):
        raise QConvertError(f"{out}/config.json: online_rotation factors {spec.get('m')} x {spec.get('p')} differ from "
                            f"this qconvert's {transform.m} x {1 << transform.lp}; use the qconvert that wrote it")
    try:
        attach_all(model, names, transform)
    except AttributeError as e:
        raise QConvertError(f"{out}/config.json: online_rotation names a layer this model lacks ({e})") from e


def _device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise QConvertError(f"device {device!r} is not a device name; use 'cpu' or 'cuda'") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise QConvertError(f"device {device!r}: quantized layers run on 'cpu' (the exact reference) or 'cuda' (the kernels)")
    from qconvert_kernels.w4a8 import cuda as kcuda

    if not kcuda.available():
        raise QConvertError(f"device {device!r}: no usable GPU here (the kernels need cupy, pip install 'qconvert[cuda]', "
                            "and an NVIDIA GPU of compute capability 8.0 or newer); use device='cpu'")
    return dev
