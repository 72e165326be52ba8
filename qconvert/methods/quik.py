"""QUIK (Ashkboos et al., 2023, arXiv 2310.09259): int4 weights and activations, fp16 outliers.

For every linear (layouts ``quik-w4a4`` / ``quik-w8a8``, qconvert_kernels/quik/reference.py):

- **Outlier channels.**  The input channels of the largest calibration activations stay in fp16,
  weights and activations: by max |x| (ℓ∞ over all calibration tokens, per channel; ``outlier_select
  = "amax"``, the paper's) or by mean square (the diagonal of H; "rms", quik-w4a4's: a channel
  large on every token widens every token's int4 range, one with a single spike only that token's).
  Layers that read one tensor (q/k/v, gate/up) share one set.  How many (``outliers``):
  "auto" = the paper's 256 at K = 4096, i.e. K / 16, rounded down to a multiple of 16 and at
  most 256 (SmolLM2: 32 of 576, 96 of 1536; Llama-3-8B: 256 of 4096, 256 of 14336); an integer
  (``quantize --outliers N``) takes N everywhere, 0 none.
- **Weights.**  The outlier columns are moved last and GPTQ (qconvert/solvers/gptq.py, ``keep_last``)
  quantizes the others, act-order among them, so the fp16 columns absorb the error of every
  quantized column; symmetric b-bit per output channel, the scale chosen by a clipping search
  (1.0, 0.975, ... ``clip_min``) weighted by diag H.  ``base = "rtn"``: the same grid, rounded
  to nearest, no error feedback.
- **Activations.**  Per token, asymmetric, b bits, quantized at run time over the base channels
  (min / max of the token, times ``act_clip``: QuaRot's activation clipping, 0.9 in quik-w4a4,
  where the few values beyond the shrunken range saturate); the zero point's share of the
  product uses the weight row sums R[n] = Σ_k q[n, k], stored.  Calibration runs the next layers
  through the same clipped activations.
- **Bits per layer.**  ``bits`` for all layers, except those matching ``int8_layers`` (fnmatch on
  the module name), which run W8A8: the paper's choice for down_proj, whose inputs (the SwiGLU
  product) are the hardest to quantize.  ``quik-w4a4`` sets ``int8_layers = ["*.down_proj"]``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

import torch

from qconvert.errors import QConvertError
from qconvert.formats.packing import pack_int4, pad_columns
from qconvert.layouts.quik import auto_outliers
from qconvert.methods.base import Method, QuantizedLinear, check_solver_params, relative_weight_error as _rel
from qconvert.solvers.gptq import gptq, relative_output_error
from qconvert.solvers.grids import IntGrid, clip_factors
from qconvert_kernels.quik.reference import K_TILE, dequantize_split, split_columns, valid_clip


@dataclass(frozen=True)
class QuikConfig:
    bits: int = 4  # weights and activations of the base channels: 4 or 8
    outliers: int | str = "auto"  # fp16 input channels per linear: "auto" (K/16, <= 256) or a count
    int8_layers: list = field(default_factory=list)  # fnmatch patterns of layers run W8A8 instead
    base: str = "gptq"  # "gptq" or "rtn" (calibration still picks the outliers)
    clip_min: float = 0.8  # weight range search: 1.0, 0.975, ... clip_min (1: off)
    damp: float = 0.01
    act_order: bool = True
    act_clip: float = 1.0  # each token's activation range (min, max) times this at run time; (0, 1]
    outlier_select: str = "amax"  # outlier channels by "amax" (max |x|) or "rms" (mean x^2, H's diagonal)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise QConvertError(f"quik: bits={self.bits!r} must be 4 or 8")
        if not valid_clip(self.act_clip):
            raise QConvertError(f"quik: act_clip={self.act_clip!r} must be a number in (0, 1] (1: no clipping; "
                                "quik-w4a4 uses 0.9)")
        if not (self.outliers == "auto" or (type(self.outliers) is int and self.outliers >= 0)):
            raise QConvertError(f"quik: outliers={self.outliers!r} must be 'auto' or a count >= 0 (0: no fp16 channels)")
        if self.outlier_select not in ("amax", "rms"):
            raise QConvertError(f"quik: outlier_select={self.outlier_select!r} must be 'amax' (largest max |x|) or "
                                "'rms' (largest mean square)")
        if not (isinstance(self.int8_layers, (list, tuple)) and all(isinstance(p, str) for p in self.int8_layers)):
            raise QConvertError(f"quik: int8_layers={self.int8_layers!r} must be a list of module-name patterns")
        check_solver_params("quik", self.base, self.damp, self.clip_min, self.act_order)

    def outlier_count(self, k: int) -> int:
        n = auto_outliers(k) if self.outliers == "auto" else self.outliers
        if n > k - 1:
            raise QConvertError(f"quik: {n} outlier channels leave nothing to quantize in a layer with {k} inputs; "
                                f"pass --outliers below {k}")
        return n

    def bits_of(self, name: str) -> int:
        return 8 if any(fnmatch.fnmatchcase(name, p) for p in self.int8_layers) else self.bits

    def grid(self, bits: int) -> IntGrid:
        return IntGrid(bits, clip_factors(self.clip_min))


class QuikMethod(Method):
    """Method plugin ``quik`` (presets quik-w4a4, quik-w8a8)."""

    name = "quik"
    config_class = QuikConfig
    wants_input_amax = True  # the pipeline passes the per-channel max |x| of each input
    needs_calibration = True  # outlier channels come from activation statistics, whatever the solver

    def describe(self) -> dict:
        cfg = self.config
        return {**asdict(cfg),
                "weights": {"bits": cfg.bits, "symmetric": True, "granularity": "per-channel",
                            "outliers": "fp16 input channels", "int8_layers": list(cfg.int8_layers)},
                "activations": {"bits": cfg.bits, "symmetric": False, "granularity": "per-token", "dynamic": True,
                                "outliers": "fp16", "clip": cfg.act_clip}}

    def activation_fake_quant(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - per layer instead
        raise QConvertError("quik: activations are quantized per layer (QuantizedLinear.activation)")

    def quantize_linear(self, name: str, weight: torch.Tensor) -> QuantizedLinear:
        raise QConvertError(f"quik needs calibration data to choose the outlier channels of {name}; "
                            "run quantize with --calib (c4 / wikitext2 / file / self)")

    def quantize_linears(self, names: list[str], weights: list[torch.Tensor], hessian: torch.Tensor,
                         input_amax: torch.Tensor | None = None) -> list[QuantizedLinear]:
        cfg = self.config
        k = weights[0].shape[1]
        if input_amax is None:
            raise QConvertError("quik: the pipeline did not pass the inputs' max |x| (needed for the outliers)")
        n_out = cfg.outlier_count(k)
        # the n channels of largest max |x| or mean square, ties broken by index; stored ascending (chosen on the
        # CPU: a few thousand values, and the index helpers of the reference live there)
        score = input_amax if cfg.outlier_select == "amax" else torch.diagonal(hessian)
        order = torch.argsort(score.float().cpu(), descending=True, stable=True)
        outlier_idx = torch.sort(order[:n_out]).values
        base_idx = split_columns(k, outlier_idx)
        perm = torch.cat([base_idx, outlier_idx])
        h = hessian[perm][:, perm]
        kb = len(base_idx)
        out: list[QuantizedLinear] = []
        for bits in sorted({cfg.bits_of(n) for n in names}):  # q/k/v or gate/up: one width in practice
            part = [i for i, n in enumerate(names) if cfg.bits_of(n) == bits]
            stacked = torch.cat([weights[i].float()[:, perm] for i in part])
            grid = cfg.grid(bits)
            if cfg.base == "gptq":
                res = gptq(stacked, h, grid, kb, damp=cfg.damp, act_order=cfg.act_order, keep_last=n_out)
                q_all, s_all, kept, secs = res.q[:, :kb], res.scales[:, 0], res.kept, res.seconds
            else:
                diag = torch.diagonal(h)[:kb]
                s_all = grid.scales(stacked[:, :kb], torch.where(diag > 0, diag, torch.ones_like(diag)))
                q_all = grid.quantize(stacked[:, :kb], s_all[:, None]).to(torch.int8)
                kept, secs = stacked[:, kb:], 0.0
            act = _ActQuant(k, outlier_idx, bits, hessian.device, cfg.act_clip)
            row = 0
            for i in part:
                w = weights[i].float()
                n = w.shape[0]
                ql = self._finish(w, q_all[row: row + n], s_all[row: row + n],
                                  kept[row: row + n] if n_out else w.new_zeros(n, 0), base_idx, outlier_idx, bits)
                ql.info.update(gptq_seconds=round(secs * n / stacked.shape[0], 4), solved_with=len(part),
                               gptq_loss=relative_output_error(w, ql.dequantized, hessian))
                ql.activation = act
                out.append((i, ql))
                row += n
        return [ql for _, ql in sorted(out, key=lambda t: t[0])]

    def _finish(self, w, q, s, w_out, base_idx, outlier_idx, bits) -> QuantizedLinear:
        n, k = w.shape
        qp = pad_columns(q, K_TILE)
        layout = f"quik-w{bits}a{bits}"
        w_out16 = w_out.half()
        tensors = {"qweight": pack_int4(qp) if bits == 4 else qp.contiguous(),
                   "shape": torch.tensor([n, k], dtype=torch.int64, device="cpu"),
                   "wscale": s.float().contiguous(),
                   "wsum": q.to(torch.int32).sum(1, dtype=torch.int32),
                   "outlier_idx": outlier_idx.to(torch.int32).contiguous(),
                   "outlier_weight": w_out16.contiguous()}
        deq = torch.empty(n, k, device=w.device)
        deq[:, base_idx] = (q.double() * s.double()[:, None]).float()
        deq[:, outlier_idx] = w_out16.float()
        info = {"layout": layout, "shape": [n, k], "bits": bits, "outliers": int(len(outlier_idx)),
                "base": self.config.base, "weight_error": _rel(w, deq)}
        return QuantizedLinear(layout, tensors, info, deq)


class _ActQuant:
    """The run-time activation quantizer of one set of layers, in float (calibration)."""

    def __init__(self, k: int, outlier_idx: torch.Tensor, bits: int, device: torch.device, clip: float):
        self.mask = torch.zeros(k, dtype=torch.bool, device=device)
        self.mask[outlier_idx] = True
        self.bits, self.clip = bits, clip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize_split(x, self.mask, self.bits, self.clip)
