"""Layouts ``quik-w4a4`` and ``quik-w8a8`` (QUIK): b-bit base channels, fp16 outlier channels.

Stored (n outlier channels, Kbp = K - n padded to 64; docs/format.md):

    qweight         b = 4: uint8 [N, Kbp/2] packed int4; b = 8: int8 [N, Kbp] — the base
                    channels in ascending order, symmetric per output channel
    shape           int64 [2]      the true [N, K]
    wscale          float32 [N]    weight scale per output channel
    wsum            int32 [N]      Σ_k q[n, k] (the activations' zero point meets it)
    outlier_idx     int32 [n]      the fp16 input channels, ascending
    outlier_weight  float16 [N, n] their weights

At run time the base channels' activations are quantized per token, asymmetric, b bits, over the
token's min / max times ``act_clip`` (the method's recorded config; 1 when absent); the
outlier channels stay fp16 (qconvert_kernels/quik/reference.py on CPU, qconvert_kernels/quik/cuda.py
on a GPU: split-and-quantize, then the integer GEMM whose epilogue adds the fp16 outlier product).
On sm_90 and newer a 4-bit layer runs on the repacked W4A8 decode and prefill kernels:
``prepare_cuda`` repacks its base weights once, and the GPU then holds only that copy
(``keep_stored_on_host``).
"""

from __future__ import annotations

import torch

from qconvert.errors import NoKernel, QConvertError
from qconvert.formats.packing import unpack_int4
from qconvert.layouts.base import Layout, NotExportable, QuantizedModule, TensorSpec, finite_positive, shape_check
from qconvert_kernels.quik import reference as refq

MAX_AUTO_OUTLIERS = 256
OUTLIER_MULTIPLE = 16


def auto_outliers(k: int) -> int:
    """The "auto" outlier count: K / 16 rounded down to a multiple of 16, at most 256."""
    return min(MAX_AUTO_OUTLIERS, (k // 16) // OUTLIER_MULTIPLE * OUTLIER_MULTIPLE)


def _clip_words(clip) -> str:
    return f"; each token's range clipped to {clip:g} of its min / max" if clip != 1 else ""


class QuikLinear(QuantizedModule):
    """A QUIK linear (see the module docstring)."""

    def __init__(self, layout: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 act_clip: float = 1.0):
        super().__init__()
        self.layout = layout
        self.bits = 4 if layout == "quik-w4a4" else 8
        self.act_clip = refq.clip32(act_clip)
        self.out_features, self.in_features = (int(v) for v in tensors["shape"])
        for name in ("qweight", "wscale", "wsum", "outlier_idx", "outlier_weight"):
            self.register_buffer(name, tensors[name])
        k, idx = self.in_features, tensors["outlier_idx"]
        self.register_buffer("base_idx", refq.split_columns(k, idx).to(torch.int32), persistent=False)  # what the kernel reads
        self.kbp = refq.padded_base(k - idx.numel())
        self._bias(bias)
        self._prepared = None  # the repacked base weights (quik/cuda.py: prepare_repacked), once made

    def extra_repr(self):
        return (f"{self.layout}, in_features={self.in_features}, out_features={self.out_features}, "
                f"outliers={self.outlier_idx.numel()}" + (f", act_clip={self.act_clip:.4g}" if self.act_clip != 1.0 else ""))

    def weights_int8(self) -> torch.Tensor:
        """q int8 [N, Kbp] (unpacked codes kept within the CPU cache's budget)."""
        return self.derived("q", lambda: unpack_int4(self.qweight)) if self.bits == 4 else self.qweight

    def check_cuda(self, name: str) -> None:
        from qconvert_kernels.quik import cuda as cuda_quik

        try:
            cuda_quik.check_gemm_shape(name, 1, self.out_features, self.kbp)
        except ValueError as e:
            raise NoKernel(f"{e}; this OUT runs on CPU only") from None

    def _repacked_on(self, device: torch.device) -> bool:
        """Whether a 4-bit layer runs on the repacked kernels on ``device``: a GPU of sm_90 or newer
        (quik/cuda.py: int4_path "s8r"), or the CPU where the emulator runs them."""
        if self.bits != 4:
            return False
        if device.type != "cuda":
            return device.type == "cpu"
        from qconvert_kernels.quik import cuda as cuda_quik

        return cuda_quik.int4_path(device) == "s8r"

    def prepare_cuda(self, device: torch.device | None = None) -> None:
        """Repack a 4-bit layer's base weights once for the repacked kernel (sm_90 and newer; an
        explicit ``device="cpu"`` prepares for the CPU emulator); may synchronize: load time."""
        device = torch.device(device) if device is not None else self.qweight.device
        if self._prepared is None and self._repacked_on(device):
            from qconvert_kernels.quik import cuda as cuda_quik

            self._prepared = cuda_quik.prepare_repacked(self.qweight, self.wscale, self.wsum, device)

    def keep_stored_on_host(self) -> None:
        """Once repacked, the kernel reads only that copy: ``qweight`` moves to (and stays in) host
        memory through later moves of the module, where the CPU path still finds it (the GPU holds
        the base weights once)."""
        if self._prepared is None:
            return
        self.hold_on_host(("qweight",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        on_emulator = not x.is_cuda and self._prepared is not None and self._prepared.w4.wq.device == x.device
        if x.is_cuda or on_emulator:
            from qconvert_kernels.quik import cuda as cuda_quik

            if x.is_cuda:
                self.prepare_cuda(x.device)  # a no-op once prepared, and on the paths without a repack
            y = cuda_quik.quik_linear(x2, self.base_idx, self.outlier_idx, self.qweight, self.wscale, self.wsum,
                                      self.outlier_weight, self.bits, clip=self.act_clip,
                                      path="s8r" if self._prepared is not None else None, prepared=self._prepared)
        else:
            xq, s, z, x_out = refq.quantize_split(x2, self.base_idx, self.outlier_idx, self.bits, self.act_clip)
            y = refq.quik_gemm(xq, s, z, self.weights_int8(), self.wscale, self.wsum,
                               refq.outlier_product(x_out, self.outlier_weight))
        return self._finish(y, x, shape)


class QuikLayout(Layout):
    """quik-w4a4 / quik-w8a8: see the module docstring."""

    def __init__(self, name: str, doc: str, bits: int):
        super().__init__(name, doc)
        self.bits = bits

    def params(self, config: dict, shape_of) -> dict:
        idx = shape_of("outlier_idx")
        clip = config.get("act_clip", 1.0)
        if not refq.valid_clip(clip):
            raise QConvertError(f"config.json: quantization_config.config act_clip={clip!r} of layout {self.name} "
                                "must be a number in (0, 1]; re-run qconvert quantize")
        return {"outliers": idx[0] if idx is not None and len(idx) == 1 else 0, "act_clip": float(clip)}

    def export_scheme(self, n, k, outliers=0, act_clip=1.0) -> dict:
        kept = f", {outliers} input channels kept in fp16 beside them" if outliers else ""
        raise NotExportable(f"layout {self.name} (QUIK: int{self.bits} weights, asymmetric per-token int{self.bits} "
                            f"activations{kept}) has no compressed-tensors equivalent, and neither has any QUIK layer; "
                            "the nearest exportable schemes are w8a8 (int8) and is-w4a8 (int4 weights, int8 activations)")

    def spec(self, n: int, k: int, outliers: int, act_clip: float = 1.0) -> dict[str, TensorSpec]:
        kbp = refq.padded_base(k - outliers)
        four = self.bits == 4
        return {"qweight": TensorSpec(torch.uint8 if four else torch.int8, (n, kbp // 2 if four else kbp),
                                      "base-channel weights" + (", two int4 per byte" if four else "")),
                "shape": TensorSpec(torch.int64, (2,), "the true [N, K]"),
                "wscale": TensorSpec(torch.float32, (n,), "weight scale per output channel"),
                "wsum": TensorSpec(torch.int32, (n,), "row sums of the integer weights"),
                "outlier_idx": TensorSpec(torch.int32, (outliers,), "fp16 input channels, ascending"),
                "outlier_weight": TensorSpec(torch.float16, (n, outliers), "their weights")}

    def check(self, name, tensors, n, k, outliers, act_clip: float = 1.0) -> list[str]:
        problems = shape_check(name, tensors, n, k)
        idx = tensors["outlier_idx"]
        if outliers and (int(idx.min()) < 0 or int(idx.max()) >= k or len(torch.unique(idx)) != outliers):
            problems.append(f"{name}.outlier_idx must hold {outliers} distinct channels in [0, {k})")
        problems += finite_positive(name, tensors["wscale"], "wscale")
        q8 = unpack_int4(tensors["qweight"]) if self.bits == 4 else tensors["qweight"]
        if (q8[:, k - outliers:] != 0).any():
            problems.append(f"{name}.qweight has non-zero padding columns")
        elif not torch.equal(q8.to(torch.int32).sum(1, dtype=torch.int32), tensors["wsum"]):
            problems.append(f"{name}.wsum is not the row sum of qweight (the zero-point term would be wrong)")
        return problems

    def module(self, tensors, bias, outliers, act_clip: float = 1.0) -> QuikLinear:
        return QuikLinear(self.name, tensors, bias, act_clip)

    def figures(self, row: dict) -> dict[str, str]:
        return {"extra": f"{row['outliers']} fp16 ch"}

    def card_rows(self, config: dict) -> list[tuple[str, str]]:
        w = config.get("weights") or {}
        int8 = ", ".join(w.get("int8_layers") or [])
        count = "K/16 per layer, at most 256" if config.get("outliers") == "auto" else f"{config.get('outliers')} per layer"
        chosen = "mean square" if config.get("outlier_select") == "rms" else "max |x|"
        return [("weights", f"int{config.get('bits')}, symmetric, per output channel; the input channels with outlier "
                            f"activations ({count}, by largest calibration {chosen}) kept in fp16"
                            + (f"; layers matching {int8} in int8" if int8 else "")),
                ("activations", f"int{config.get('bits')}, dynamic, per-token, asymmetric, on all but the outlier channels "
                                "(fp16), quantized as the model runs" + _clip_words(config.get("act_clip", 1.0)))]

    def tags(self, config: dict) -> list[str]:
        b = config.get("bits")
        return [f"int{b}", f"w{b}a{b}", f"int{b}-activations", "quik", "fp16-outliers"]

    def random_tensors(self, n, k, gen, device, outliers=None, act_clip: float = 1.0) -> dict[str, torch.Tensor]:
        """Random weights with the "auto" outlier count (or ``outliers``) and sorted random outlier channels."""
        n_out = auto_outliers(k) if outliers is None else outliers
        kbp = refq.padded_base(k - n_out)
        qw = torch.randint(-128, 128, (n, kbp // 2 if self.bits == 4 else kbp), generator=gen, device=device,
                           dtype=torch.int8)
        return {"qweight": qw.view(torch.uint8) if self.bits == 4 else qw, "shape": torch.tensor([n, k], dtype=torch.int64),
                "wscale": torch.rand(n, generator=gen, device=device) * 0.01,
                "wsum": torch.randint(-1000, 1000, (n,), generator=gen, device=device, dtype=torch.int32),
                "outlier_idx": torch.sort(torch.randperm(k, generator=gen, device=device)[:n_out]).values.to(torch.int32),
                "outlier_weight": torch.randn((n, n_out), generator=gen, device=device, dtype=torch.float16) * 0.02}


QUIK_W4A4 = QuikLayout("quik-w4a4", "QUIK: int4 base channels (weights and per-token asymmetric activations), fp16 outlier "
                       "channels", bits=4)
QUIK_W8A8 = QuikLayout("quik-w8a8", "QUIK: int8 base channels, fp16 outlier channels", bits=8)
