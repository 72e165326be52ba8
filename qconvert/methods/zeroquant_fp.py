"""ZeroQuant-FP (Wu et al., 2023, arXiv 2307.09782): FP4 / FP8 weights, FP8 activations, LoRC.

Weights, ``weight_format = "fp4"`` (layout ``fp4-fp8``): E2M1 values w, group-wise along K, with
the scale of group j of row n constrained to c[n] * 2^e[n, j]:

    W[n, k] ~= w[n, k] * 2^e[n, k // g] * c[n]       c float32 per output channel, e int8

This is the paper's second power-of-two mapping (a real per-row scale and power-of-two group
factors under it), not its first (each group scale rounded to a power of two on its own): the
row's largest group then uses the full E2M1 range exactly, and what makes FP4 -> FP8 a pure
exponent shift holds all the same, because w * 2^e is an E4M3 number whenever w is E2M1.
c[n] = max_j amax_j / 6 from the weights before GPTQ, and for each group the exponent is the
smallest e with amax_j <= 6 * c * 2^e (e <= 0 before GPTQ moves the weights), optionally also
trying e - 1 (``exp_search``: the group's extreme then saturates at 6 but the rest gets a twice
finer grid), keeping the one with the smaller diag-H-weighted squared error.  The kernel widens
E2M1 to E4M3 by re-biasing the exponent (an exact conversion, no scale folded in), multiplies
each group's FP8 partial by 2^e in float (exact: a power of two) and applies c[n] once at the end.

GPTQ handles integer levels: ``FP4Grid`` hands it the levels 2w (integers in [-12, 12]) with
the scales c * 2^(e - 1), so that level * scale is the dequantized weight.

Weights, ``weight_format = "fp8"`` (layout ``fp8-fp8``): E4M3 per output channel, round to
nearest, float32 scale s[n] = amax_n / 448 (not a power of two: it is applied once per output,
so nothing is gained by constraining it).  Activations (both): E4M3 per token, dynamic, see
qconvert_kernels/fp8/reference.py.

LoRC (``lorc_rank`` r > 0): E = W - Ŵ after GPTQ, E ~= U V by a rank-r SVD (U = U_r S^1/2,
V = S^1/2 V_rᵀ, stored fp16), and the layer computes y = Q(x) Ŵᵀ + (Q(x) Vᵀ) Uᵀ: the correction
reads the same FP8 activations Q(x) as the main GEMM (as the paper's runtime does), so the
layers calibrated after this one see exactly Q(x) (Ŵ + UV)ᵀ, what the runtime computes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qconvert.errors import QConvertError
from qconvert.formats.fp4 import levels_to_codes, pack_fp4
from qconvert.formats.packing import pad_columns
from qconvert.layouts.fp8 import FP8_K_MULTIPLE
from qconvert.methods.base import Method, QuantizedLinear, check_solver_params, relative_weight_error as _rel
from qconvert.solvers.gptq import gptq, relative_output_error
from qconvert.solvers.grids import FP4Grid, pow2
from qconvert.solvers.lorc import lorc_factors
from qconvert_kernels.fp8.reference import E2M1_MAX, FP8_MAX, quantize_per_token_fp8, to_e4m3

CLIP_STEP = 0.05  # the row-scale search's step


@dataclass(frozen=True)
class ZeroQuantFPConfig:
    weight_format: str = "fp4"  # "fp4" (E2M1, group-wise, power-of-two group factors) or "fp8" (E4M3, per channel)
    group_size: int = 128  # fp4 only
    base: str = "gptq"  # "gptq" (fp4: calibrated, qconvert/solvers/gptq.py) or "rtn"
    lorc_rank: int = 8  # rank of the low-rank compensation; 0: none
    exp_search: bool = True  # fp4: try 2^e and 2^(e-1) per group (diag-H weighted with GPTQ)
    lorc_weighting: str = "none"  # "none": SVD of E (the paper); "hessian": SVD of E L, H = L Lᵀ (output error)
    clip_min: float = 1.0  # fp4: search the row scale c over 1.0, 0.95, ... clip_min (diag-H weighted); 1 = off
    damp: float = 0.01
    act_order: bool = True

    def __post_init__(self):
        if self.weight_format not in ("fp4", "fp8"):
            raise QConvertError(f"zeroquant-fp: weight_format={self.weight_format!r} must be 'fp4' or 'fp8'")
        if not (isinstance(self.group_size, int) and 2 <= self.group_size <= 8192 and self.group_size % 2 == 0):
            raise QConvertError(f"zeroquant-fp: group_size={self.group_size!r} must be an even integer in 2..8192 (128 is the default)")
        check_solver_params("zeroquant-fp", self.base, self.damp, self.clip_min, self.act_order)
        if self.base == "gptq" and self.weight_format == "fp8":
            raise QConvertError("zeroquant-fp: GPTQ is offered for fp4 weights only (the shared solver keeps integer "
                                "levels, FP8 levels are not); set base = 'rtn' (or --base rtn) for fp8 weights")
        if not (type(self.lorc_rank) is int and 0 <= self.lorc_rank <= 4096):
            raise QConvertError(f"zeroquant-fp: lorc_rank={self.lorc_rank!r} must be an integer in 0..4096 (0 turns LoRC off)")
        if self.lorc_weighting not in ("none", "hessian"):
            raise QConvertError(f"zeroquant-fp: lorc_weighting={self.lorc_weighting!r} must be 'none' or 'hessian'")
        if self.lorc_weighting == "hessian" and self.base != "gptq":
            raise QConvertError("zeroquant-fp: lorc_weighting = 'hessian' needs calibration (base = 'gptq')")
        if not isinstance(self.exp_search, bool):
            raise QConvertError("zeroquant-fp: exp_search must be true or false")


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """c [N] = max_k |W[n, k]| / 6, rounded up to float32 so that 6 c >= max |W| holds exactly
    (the row's largest group then gets e = 0); 1 for an all-zero row."""
    amax = weight.float().abs().amax(dim=1)
    c = amax / E2M1_MAX
    c = torch.where(c.double() * E2M1_MAX < amax.double(), torch.nextafter(c, torch.full_like(c, float("inf"))), c)
    return torch.where(amax > 0, c, torch.ones_like(amax))


def fp4_rtn(weight: torch.Tensor, group_size: int, search: bool, importance: torch.Tensor | None = None,
            row_scale: torch.Tensor | None = None):
    """Round-to-nearest on the FP4 grid: (levels int8 [N, Kp], exponents [N, G], c [N])."""
    w = pad_columns(weight.float(), group_size)
    n, kp = w.shape
    grid = FP4Grid(row_scales(weight) if row_scale is None else row_scale, search)
    groups = w.reshape(n, -1, group_size)
    imp = pad_columns(importance.float()[None], group_size).reshape(-1, group_size) if importance is not None else None
    exps = grid.exponents(groups, imp)  # [N, G]
    s = grid.row_scale.float()[:, None] * pow2(exps - 1)
    levels = grid.quantize(groups, s[..., None]).reshape(n, kp)
    return levels.to(torch.int8), exps, grid.row_scale


def search_row_scales(weight: torch.Tensor, group_size: int, search: bool, clip_min: float,
                      importance: torch.Tensor | None = None) -> torch.Tensor:
    """c [N]: the row scale max|W| / 6 shrunk by the factor in 1.0, 0.95, ... clip_min that
    minimises the row's (diag-H-weighted) round-to-nearest error, exponents re-chosen for each."""
    c0 = row_scales(weight)
    steps = int(round((1.0 - clip_min) / CLIP_STEP))
    if steps == 0:
        return c0
    groups = pad_columns(weight.float(), group_size).reshape(weight.shape[0], -1, group_size)
    imp = None if importance is None else pad_columns(importance.float()[None], group_size).reshape(-1, group_size)
    best, best_err = c0, None
    for i in range(steps + 1):
        c = c0 * (1.0 - CLIP_STEP * i)
        e, err = FP4Grid(c, True).exponents_and_errors(groups, imp)  # the search's error is the RTN error
        err = err.sum(-1)
        if best_err is None:
            best_err = err
        else:
            best = torch.where(err < best_err, c, best)
            best_err = torch.minimum(err, best_err)
    return best


def fp4_dequantize(levels: torch.Tensor, exps: torch.Tensor, c: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """float32 [N, K]: (levels / 2) * 2^e * c, computed in float64 and rounded once."""
    n, kp = levels.shape
    scale = c.double()[:, None] * pow2(exps - 1).double()  # c * 2^(e-1), with the level 2w
    w = levels.double().reshape(n, -1, group_size) * scale[..., None]
    return w.reshape(n, kp)[:, :k].float()


class ZeroQuantFPMethod(Method):
    """Method plugin ``zeroquant-fp`` (presets zqfp-w4a8, zqfp-w4a8-nolorc, zqfp-w8a8)."""

    name = "zeroquant-fp"
    config_class = ZeroQuantFPConfig

    def describe(self) -> dict:
        cfg = self.config
        weights = ({"format": "e2m1", "granularity": "group", "group_size": cfg.group_size,
                    "scales": "float32 per channel x power-of-two per group"} if cfg.weight_format == "fp4" else
                   {"format": "e4m3", "granularity": "per-channel", "scales": "float32"})
        return {**asdict(cfg), "weights": weights,
                "activations": {"format": "e4m3", "granularity": "per-token", "dynamic": True, "max": FP8_MAX}}

    def activation_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The runtime's per-token E4M3 round trip, in float: xq * t."""
        shape = x.shape
        xq, t = quantize_per_token_fp8(x.reshape(-1, shape[-1]))
        return (xq.float() * t[:, None]).reshape(shape).to(x.dtype)

    def quantize_linear(self, name: str, weight: torch.Tensor) -> QuantizedLinear:
        """Round-to-nearest (no calibration data), then LoRC."""
        cfg = self.config
        w = weight.float()
        if cfg.weight_format == "fp8":
            return self._finish_fp8(w)
        c = search_row_scales(w, cfg.group_size, cfg.exp_search, cfg.clip_min)
        levels, exps, c = fp4_rtn(w, cfg.group_size, cfg.exp_search, row_scale=c)
        return self._finish_fp4(w, levels, exps, c, None, {})

    def quantize_linears(self, names: list[str], weights: list[torch.Tensor], hessian: torch.Tensor,
                         input_amax: torch.Tensor | None = None) -> list[QuantizedLinear]:
        """GPTQ on the FP4 grid, layers reading one input stacked; then LoRC per layer.

        One CPU thread, as qconvert.solvers.gptq: with the second core busy, two threads made the LoRC
        factorisation of a 1536 x 576 error 14x slower here (5.7 s against 0.4 s)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._quantize_linears(weights, hessian)
        finally:
            torch.set_num_threads(threads)

    def _quantize_linears(self, weights, hessian):
        cfg = self.config
        originals = [w.float() for w in weights]
        stacked = torch.cat(originals)
        diag = torch.diagonal(hessian).float()
        c_all = search_row_scales(stacked, cfg.group_size, cfg.exp_search, cfg.clip_min, torch.where(diag > 0, diag, torch.ones_like(diag)))
        res = gptq(stacked, hessian, FP4Grid(c_all, cfg.exp_search), cfg.group_size, damp=cfg.damp,
                   act_order=cfg.act_order)
        out, row = [], 0
        for w in originals:
            n = w.shape[0]
            c = c_all[row: row + n]
            ratio = res.scales[row: row + n].double() / c.double()[:, None]
            exps = torch.round(torch.log2(ratio)).long() + 1  # the scales are c * 2^(e - 1) exactly
            levels = pad_columns(res.q[row: row + n], cfg.group_size)
            extra = {"gptq_seconds": round(res.seconds * n / res.q.shape[0], 4), "dead_inputs": res.dead,
                     "solved_with": len(weights)}
            ql = self._finish_fp4(w, levels, exps, c, hessian, extra)
            rl, re_, rc = fp4_rtn(w, cfg.group_size, False)
            ql.info["rtn_loss"] = relative_output_error(w, fp4_dequantize(rl, re_, rc, cfg.group_size, w.shape[1]), hessian)
            out.append(ql)
            row += n
        return out

    def _lorc(self, w: torch.Tensor, w_hat: torch.Tensor, tensors: dict, info: dict, hessian) -> torch.Tensor:
        """Adds lorc_u / lorc_v for rank > 0; returns the weight the layer computes with."""
        rank = self.config.lorc_rank
        if hessian is not None:
            info["gptq_loss"] = relative_output_error(w, w_hat, hessian)
        if rank == 0:
            return w_hat
        weighted = self.config.lorc_weighting == "hessian" and hessian is not None
        u, v = lorc_factors(w - w_hat, rank, hessian if weighted else None, self.config.damp)
        tensors.update(lorc_u=u, lorc_v=v)
        w_run = w_hat + u.float() @ v.float()
        info.update(lorc_rank=rank, weight_error=_rel(w, w_hat), weight_error_lorc=_rel(w, w_run))
        if hessian is not None:
            info["lorc_loss"] = relative_output_error(w, w_run, hessian)
        return w_run

    def _finish_fp4(self, w, levels, exps, c, hessian, extra) -> QuantizedLinear:
        cfg = self.config
        n, k = w.shape
        # packed on the CPU (the code table lives there); OUT is written from the CPU anyway
        tensors = {"qweight": pack_fp4(levels_to_codes(levels.cpu())), "shape": torch.tensor([n, k], dtype=torch.int64, device="cpu"),
                   "sexp": exps.to(torch.int8), "cscale": c.float().contiguous()}
        info = {"layout": "fp4-fp8", "shape": [n, k], "bits": 4, "group_size": cfg.group_size, "base": cfg.base,
                "min_exp": int(exps.min()), "max_exp": int(exps.max()), **extra}
        w_run = self._lorc(w, fp4_dequantize(levels, exps, c, cfg.group_size, k), tensors, info, hessian)
        return QuantizedLinear("fp4-fp8", tensors, info, w_run)

    def _finish_fp8(self, w) -> QuantizedLinear:
        n, k = w.shape
        amax = w.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        wq = to_e4m3(w / s[:, None])
        kp = -(-k // FP8_K_MULTIPLE) * FP8_K_MULTIPLE
        qweight = pad_columns(wq.view(torch.uint8), FP8_K_MULTIPLE).view(torch.float8_e4m3fn)
        tensors = {"qweight": qweight, "shape": torch.tensor([n, k], dtype=torch.int64, device="cpu"), "wscale": s.float()}
        info = {"layout": "fp8-fp8", "shape": [n, k], "bits": 8, "group_size": None, "padded_k": kp, "base": "rtn"}
        w_hat = (wq.double() * s.double()[:, None]).float()
        w_run = self._lorc(w, w_hat, tensors, info, None)
        return QuantizedLinear("fp8-fp8", tensors, info, w_run)
