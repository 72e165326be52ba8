"""Load a native OUT into a torch model whose quantized linears run the kernels' arithmetic.

On CPU each quantized linear runs ``qconvert_kernels.w4a8.reference``: int8 activations x int4
weights -> int32 group partials -> x integer scale -> int32 sum -> one float conversion,
exactly what the CUDA kernel computes.  On a CUDA device (``load(OUT, device="cuda")``) the
W4A8 layers run the CUDA kernels of ``qconvert_kernels.w4a8.cuda`` on the packed weights as
stored (fused per-token int8 quantizer, then the int8 tensor-core GEMM); their results equal
the CPU reference's rounded to the activations' fp16 / bf16.  Weight-only ``w4a16`` layers
dequantize once and use torch's float matmul on either device.  ZeroQuant-FP layers
(``fp4-fp8``, ``fp8-fp8``, ``FP8Linear``) run ``qconvert_kernels.fp8.reference`` on CPU (FP8
activations, exact group sums) and the FP8 kernels of ``qconvert_kernels.fp8.cuda`` on an
sm_89+ GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qconvert.errors import QConvertError
from qconvert.formats.native import read_quant_config
from qconvert.formats.packing import unpack_int4
from qconvert.formats.safetensors_io import ShardedReader
from qconvert.skeleton import build_skeleton
from qconvert.formats.fp4 import codes_to_values, unpack_fp4
from qconvert_kernels.w4a8 import reference as ref
from qconvert_kernels.fp8 import reference as ref8
from qconvert_kernels.quik import reference as refq


class W4A8Linear(nn.Module):
    """W4A8 linear: packed int4 group weights, dynamic per-token int8 activations.

    layout "w4a8-is": integer group scales ``iscale`` int32 [N, G], ``cscale`` float32 [N],
    ``alpha_log2`` int32 [1].  layout "w4a8-fs": float group scales ``scales`` fp16 [N, G].
    layout "w4a16": the tensors of "w4a8-fs", activations not quantized (weight-only): the
    weight is dequantized once, y = x Ŵᵀ in the activations' dtype.
    """

    SUFFIXES = {
        "w4a8-is": ("qweight", "shape", "iscale", "cscale", "alpha_log2"),
        "w4a8-fs": ("qweight", "shape", "scales"),
        "w4a16": ("qweight", "shape", "scales"),
    }

    def __init__(self, layout: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.layout = layout
        self.out_features, self.in_features = (int(v) for v in tensors["shape"])
        self.register_buffer("qweight", tensors["qweight"])
        n_groups = (tensors["iscale"] if layout == "w4a8-is" else tensors["scales"]).shape[1]
        kp = tensors["qweight"].shape[1] * 2
        if kp % n_groups or self.out_features != tensors["qweight"].shape[0] or kp < self.in_features:
            raise QConvertError(f"{layout} tensors have inconsistent shapes (qweight {tuple(tensors['qweight'].shape)}, {n_groups} groups)")
        self.group_size = kp // n_groups
        if layout == "w4a8-is":
            self.register_buffer("iscale", tensors["iscale"])
            self.register_buffer("cscale", tensors["cscale"])
            self.alpha_log2 = int(tensors["alpha_log2"][0])
        else:
            self.register_buffer("scales", tensors["scales"])
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._q = self._qf = self._w = None

    def extra_repr(self):
        return f"{self.layout}, in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

    def weights_int8(self) -> torch.Tensor:
        if self._q is None:
            self._q = unpack_int4(self.qweight)
            self._qf = ref.weight_groups_float(self._q, self.group_size)
        return self._q

    def check_cuda(self, name: str) -> None:
        """QConvertError unless the CUDA kernels can run this layer (group size, padding)."""
        from qconvert_kernels.w4a8 import cuda as kcuda

        if self.layout == "w4a16":
            return
        try:
            kcuda.check_gemm_shape(name, 1, self.out_features, self.qweight.shape[1] * 2, self.group_size)
        except ValueError as e:
            raise QConvertError(f"{e}; this OUT runs on CPU only (re-quantize with --group-size 128 for the GPU)") from None

    def _forward_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        from qconvert_kernels.w4a8 import cuda as kcuda

        if x2.dtype not in (torch.float16, torch.bfloat16):
            raise QConvertError(f"the CUDA W4A8 kernels take float16 or bfloat16 activations, got {x2.dtype}; "
                                "load with dtype=torch.float16 (the default on cuda)")
        xq, t = kcuda.quantize_per_token_int8(x2, self.qweight.shape[1] * 2)
        if self.layout == "w4a8-is":
            return kcuda.w4a8_is_gemm(xq, t, self.qweight, self.iscale, self.cscale, self.alpha_log2, self.group_size, x2.dtype)
        return kcuda.w4a8_fs_gemm(xq, t, self.qweight, self.scales, self.group_size, x2.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.layout != "w4a16":
            shape = x.shape
            y = self._forward_cuda(x.reshape(-1, shape[-1]))
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        if self.layout == "w4a16":
            if self._w is None or self._w.dtype != x.dtype:
                q = self.weights_int8().float().reshape(self.out_features, -1, self.group_size)
                w = (q * self.scales.float()[..., None]).reshape(self.out_features, -1)
                self._w = w[:, : self.in_features].to(x.dtype)
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return torch.nn.functional.linear(x, self._w, bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        q = self.weights_int8()
        xq, t = ref.quantize_per_token_int8(x2, q.shape[1])
        if self.layout == "w4a8-is":
            y = ref.w4a8_is_gemm(xq, t, q, self.iscale, self.cscale, self.alpha_log2, self.group_size, self._qf)
        else:
            y = ref.w4a8_fs_gemm(xq, t, q, self.scales, self.group_size, self._qf)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class FP8Linear(nn.Module):
    """ZeroQuant-FP linear: dynamic per-token FP8 (E4M3) activations times FP4 or FP8 weights.

    layout "fp4-fp8": ``qweight`` uint8 [N, Kp/2] packed E2M1 codes (low nibble = even column),
    ``sexp`` int8 [N, G] group exponents, ``cscale`` float32 [N]; W ~= w * 2^e * c.
    layout "fp8-fp8": ``qweight`` float8_e4m3fn [N, Kp] (Kp = K padded to 64), ``wscale`` float32 [N].
    Both: optional LoRC factors ``lorc_u`` fp16 [N, r], ``lorc_v`` fp16 [r, K], applied as
    y += ((xq * t) Vᵀ) Uᵀ on the same FP8 activations.  On CPU the forward is
    ``qconvert_kernels.fp8.reference``; on CUDA the kernels of ``qconvert_kernels.fp8.cuda``.
    """

    SUFFIXES = {
        "fp4-fp8": ("qweight", "shape", "sexp", "cscale"),
        "fp8-fp8": ("qweight", "shape", "wscale"),
    }
    OPTIONAL = ("lorc_u", "lorc_v")

    def __init__(self, layout: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.layout = layout
        self.out_features, self.in_features = (int(v) for v in tensors["shape"])
        qw = tensors["qweight"]
        self.register_buffer("qweight", qw)
        if layout == "fp4-fp8":
            n_groups = tensors["sexp"].shape[1]
            kp = qw.shape[1] * 2
            if n_groups == 0 or kp % n_groups or qw.dtype != torch.uint8:
                raise QConvertError(f"fp4-fp8 tensors have inconsistent shapes (qweight {tuple(qw.shape)}, {n_groups} groups)")
            self.group_size = kp // n_groups
            self.register_buffer("sexp", tensors["sexp"])
            self.register_buffer("cscale", tensors["cscale"])
        else:
            kp = qw.shape[1]
            if qw.dtype != torch.float8_e4m3fn or kp % ref8.FP8_CHUNK:
                raise QConvertError(f"fp8-fp8 qweight must be float8_e4m3fn [N, Kp] with Kp a multiple of {ref8.FP8_CHUNK}, "
                                    f"got {qw.dtype} {tuple(qw.shape)}")
            self.group_size = None
            self.register_buffer("wscale", tensors["wscale"])
        self.kp = kp
        if self.out_features != qw.shape[0] or kp < self.in_features:
            raise QConvertError(f"{layout} tensors have inconsistent shapes (qweight {tuple(qw.shape)}, shape {[self.out_features, self.in_features]})")
        u, v = tensors.get("lorc_u"), tensors.get("lorc_v")
        if (u is None) != (v is None) or (u is not None and (u.shape[0] != self.out_features or v.shape != (u.shape[1], self.in_features))):
            raise QConvertError(f"{layout}: lorc_u / lorc_v must both be present with shapes [N, r] and [r, K]")
        self.lorc_rank = 0 if u is None else int(u.shape[1])
        self.register_buffer("lorc_u", u)
        self.register_buffer("lorc_v", v)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._wg = None

    def extra_repr(self):
        return (f"{self.layout}, in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, lorc_rank={self.lorc_rank}")

    def check_cuda(self, name: str) -> None:
        """QConvertError unless the FP8 kernels can run this layer (arch, group size)."""
        from qconvert_kernels.fp8 import cuda as cuda_fp8

        try:
            cuda_fp8.check_device(name)
            cuda_fp8.check_gemm_shape(name, 1, self.out_features, self.kp, self.group_size or cuda_fp8.FP8_CHUNK)
        except ValueError as e:
            raise QConvertError(f"{e}; this OUT runs on CPU only") from None

    def _forward_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        from qconvert_kernels.fp8 import cuda as cuda_fp8

        xq, t = cuda_fp8.quantize_per_token_fp8(x2, self.kp)
        if self.layout == "fp4-fp8":
            y = cuda_fp8.fp4_fp8_gemm(xq, t, self.qweight, self.sexp, self.cscale, self.group_size, x2.dtype)
        else:
            y = cuda_fp8.fp8_fp8_gemm(xq, t, self.qweight, self.wscale, x2.dtype)
        if self.lorc_rank:
            y = (y.float() + ref8.lorc_term(xq, t, self.lorc_u, self.lorc_v)).to(x2.dtype)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cuda:
            y = self._forward_cuda(x2)
        else:
            xq, t = ref8.quantize_per_token_fp8(x2, self.kp)
            if self.layout == "fp4-fp8":
                if self._wg is None:
                    self._wg = ref8.weight_groups(codes_to_values(unpack_fp4(self.qweight)), self.group_size)
                y = ref8.fp4_fp8_gemm(xq, t, self._wg, self.sexp, self.cscale)
            else:
                y = ref8.fp8_fp8_gemm(xq, t, self.qweight, self.wscale)
            if self.lorc_rank:
                y = y + ref8.lorc_term(xq, t, self.lorc_u, self.lorc_v)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class QuikLinear(nn.Module):
    """QUIK linear (layouts "quik-w4a4", "quik-w8a8"): b-bit weights and per-token asymmetric
    b-bit activations on the base channels, fp16 weights and activations on the outlier channels.

    Tensors: ``qweight`` (b = 4: uint8 [N, Kbp/2] packed int4; b = 8: int8 [N, Kbp]) over the
    base channels in ascending order, Kbp = K - n padded to 64; ``wscale`` float32 [N];
    ``wsum`` int32 [N] = Σ_k q[n, k]; ``outlier_idx`` int32 [n]; ``outlier_weight`` fp16 [N, n];
    ``shape`` int64 [N, K].  On CPU the forward is ``qconvert_kernels.quik.reference``; on CUDA
    the kernels of ``qconvert_kernels.quik.cuda`` (split-and-quantize, then the integer GEMM
    whose epilogue adds the fp16 outlier product).
    """

    SUFFIXES = {lay: ("qweight", "shape", "wscale", "wsum", "outlier_idx", "outlier_weight")
                for lay in ("quik-w4a4", "quik-w8a8")}

    def __init__(self, layout: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.layout = layout
        self.bits = 4 if layout == "quik-w4a4" else 8
        self.out_features, self.in_features = (int(v) for v in tensors["shape"])
        n, k = self.out_features, self.in_features
        qw, idx, w_out = tensors["qweight"], tensors["outlier_idx"], tensors["outlier_weight"]
        n_out = idx.numel()
        kbp = refq.padded_base(k - n_out)
        want = (torch.uint8, (n, kbp // 2)) if self.bits == 4 else (torch.int8, (n, kbp))
        if (qw.dtype, tuple(qw.shape)) != want or w_out.shape != (n, n_out) or tensors["wscale"].shape != (n,) \
                or tensors["wsum"].shape != (n,) or idx.dim() != 1:
            raise QConvertError(f"{layout} tensors have inconsistent shapes (qweight {qw.dtype} {tuple(qw.shape)}, "
                                f"{n_out} outliers, shape {[n, k]}; qweight should be {want[0]} {list(want[1])})")
        if n_out and (int(idx.min()) < 0 or int(idx.max()) >= k or len(torch.unique(idx)) != n_out):
            raise QConvertError(f"{layout}: outlier_idx must hold distinct channel indices in [0, {k})")
        for name in ("qweight", "wscale", "wsum", "outlier_idx", "outlier_weight"):
            self.register_buffer(name, tensors[name])
        self.register_buffer("base_idx", refq.split_columns(k, idx).to(torch.int32), persistent=False)  # int32: what the kernel reads
        self.kbp = kbp
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._q = None

    def extra_repr(self):
        return (f"{self.layout}, in_features={self.in_features}, out_features={self.out_features}, "
                f"outliers={self.outlier_idx.numel()}")

    def weights_int8(self) -> torch.Tensor:
        """q int8 [N, Kbp] (cached)."""
        if self._q is None:
            self._q = unpack_int4(self.qweight) if self.bits == 4 else self.qweight
        return self._q

    def check_cuda(self, name: str) -> None:
        from qconvert_kernels.quik import cuda as cuda_quik

        try:
            cuda_quik.check_gemm_shape(name, 1, self.out_features, self.kbp)
        except ValueError as e:
            raise QConvertError(f"{e}; this OUT runs on CPU only") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cuda:
            from qconvert_kernels.quik import cuda as cuda_quik

            y = cuda_quik.quik_linear(x2, self.base_idx, self.outlier_idx, self.qweight, self.wscale, self.wsum,
                                      self.outlier_weight, self.bits)
        else:
            xq, s, z, x_out = refq.quantize_split(x2, self.base_idx, self.outlier_idx, self.bits)
            y = refq.quik_gemm(xq, s, z, self.weights_int8(), self.wscale, self.wsum,
                               refq.outlier_product(x_out, self.outlier_weight))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


from qconvert.illm_runtime import ILLMLinear  # noqa: E402  (it imports nothing from here)

LAYOUTS = {"w4a8-is": W4A8Linear, "w4a8-fs": W4A8Linear, "w4a16": W4A8Linear, "fp4-fp8": FP8Linear, "fp8-fp8": FP8Linear,
           "quik-w4a4": QuikLinear, "quik-w8a8": QuikLinear,
           "illm-w8a8": ILLMLinear, "illm-w4a8": ILLMLinear, "illm-w4a4": ILLMLinear}
QUANTIZED_MODULES = (W4A8Linear, FP8Linear, QuikLinear, ILLMLinear)


def layout_suffixes(layout: str, present=()) -> tuple[str, ...]:
    """The tensor suffixes of a layout: the required ones, plus the optional ones ``present``."""
    cls = LAYOUTS[layout]
    return cls.SUFFIXES[layout] + tuple(s for s in getattr(cls, "OPTIONAL", ()) if s in present)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def model_config(out: Path, cfg: dict):
    """The transformers config of an OUT's config.json (quantization_config removed)."""
    from transformers import AutoConfig

    from qconvert.source import check_architecture

    cfg = dict(cfg)
    model_type = cfg.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise QConvertError(f"{out}/config.json is not a usable model config ({e}); re-run qconvert quantize") from e
    check_architecture(config)
    return config


def load(out: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, integer: bool = True):
    """Load a native qconvert OUT as a ready-to-run ``transformers`` causal LM.

    ``dtype`` casts the unquantized tensors (embeddings, norms, lm_head); default: as stored
    on CPU, float16 on CUDA (the kernels take fp16 / bf16 activations).  ``device`` "cpu" runs
    the exact reference; "cuda" / "cuda:N" the CUDA kernels (cupy and an sm_80+ GPU needed).
    An I-LLM OUT loads as its integer-only model; ``integer=False`` gives instead the float
    model with the same quantized linears (integer weights and per-token activations, float
    norms, attention, SiLU and head): a diagnostic that separates what the integer-only glue
    costs from what the W/A quantization costs.
    """
    out = Path(out)
    dev = _device(device)
    if dev.type == "cuda" and dtype is None:
        dtype = torch.float16
    cfg, qc = read_quant_config(out)
    config = model_config(out, cfg)
    reader = ShardedReader(out)
    illm = any(lay.startswith("illm-") for lay in qc["modules"].values())
    if illm and integer:
        return _load_integer(out, config, qc, reader, dev)
    model = build_skeleton(config)
    state = {}
    for module_name, layout in qc["modules"].items():
        if layout not in LAYOUTS:
            raise QConvertError(f"{out}: layer {module_name} has layout {layout!r}, unknown to this qconvert; upgrade it")
        need = LAYOUTS[layout].SUFFIXES[layout]
        missing = [s for s in need if f"{module_name}.{s}" not in reader.where]
        if missing:
            raise QConvertError(f"{out}: tensor '{module_name}.{missing[0]}' is missing; the output is incomplete, re-run quantize")
        need = layout_suffixes(layout, {s for s in getattr(LAYOUTS[layout], "OPTIONAL", ()) if f"{module_name}.{s}" in reader.where})
        tensors = {s: reader.get(f"{module_name}.{s}") for s in need}
        bias_name = f"{module_name}.bias"
        bias = reader.get(bias_name) if bias_name in reader.where else None
        if bias is not None and dtype is not None:
            bias = bias.to(dtype)
        layer = LAYOUTS[layout](layout, tensors, bias)
        if illm:  # the stored norms carry the smoothing: the layers take their inputs as they come
            layer.run_smoothed()
        _set_module(model, module_name, layer)
    taken = {f"{m}.{s}" for m, lay in qc["modules"].items() for s in layout_suffixes(lay, getattr(LAYOUTS[lay], "OPTIONAL", ()))}
    taken |= {f"{m}.bias" for m in qc["modules"]}
    for name in reader.keys():
        if name not in taken:
            t = reader.get(name)
            state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise QConvertError(f"{out}: tensor '{result.unexpected_keys[0]}' does not belong to this model's config")
    if config.tie_word_embeddings and isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head.weight = model.get_input_embeddings().weight
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise QConvertError(f"{out}: no tensor for '{still_meta[0]}'; the output is incomplete, re-run quantize")
    if dev.type == "cuda":
        for name, mod in model.named_modules():
            if isinstance(mod, QUANTIZED_MODULES):
                mod.check_cuda(name)
        model.to(dev)
    return model.eval()


def _load_integer(out: Path, config, qc: dict, reader, dev: torch.device):
    """An I-LLM OUT: the integer-only model (qconvert/illm_runtime.py), CPU only for now."""
    from qconvert.illm_runtime import IntegerLlama

    if dev.type != "cpu":
        raise QConvertError(f"{out}: I-LLM's integer runtime runs on CPU in this release (its CUDA kernels are not "
                            "wired into a model yet); load with device='cpu'")
    linears = {}
    for module_name, layout in qc["modules"].items():
        need = ILLMLinear.SUFFIXES.get(layout)
        if need is None:
            raise QConvertError(f"{out}: layer {module_name} has layout {layout!r}; an I-LLM OUT has illm-* layouts only")
        missing = [x for x in need if f"{module_name}.{x}" not in reader.where]
        if missing:
            raise QConvertError(f"{out}: tensor '{module_name}.{missing[0]}' is missing; the output is incomplete, re-run quantize")
        linears[module_name] = ILLMLinear(layout, {x: reader.get(f"{module_name}.{x}") for x in need}, None)
    taken = {f"{m}.{x}" for m, lay in qc["modules"].items() for x in ILLMLinear.SUFFIXES[lay]}
    state = {name: reader.get(name) for name in reader.keys() if name not in taken}
    return IntegerLlama(config, linears, state).eval()


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
