"""I-LLM (Hu et al., 2024, arXiv 2405.17849): integer-only inference.

The converter's part (the layouts and their integer runtime are qconvert/layouts/illm.py):

- **Smoothing of every activation -> weight pair** (FSBR's pairs): input norm -> q/k/v,
  v -> o (per value channel, shared by the query heads of a KV group), post-attention norm ->
  gate/up, the SwiGLU product -> down (folded into up_proj's rows; not with ``--rotate
  hadamard+online``, whose run-time transform of that product stands between the two).  Per channel
  s = max|X|^α / max|W|^(1-α) (SmoothQuant's rule, α = ``alpha``) from a float pass of the block
  over the calibration tokens, then folded into the norm weights and the linears: the model's
  float function is unchanged, the activations the runtime quantizes are flatter.  FSBR's
  block reconstruction (qconvert/methods/fsbr.py) then refines s by ``fsbr_steps`` Adam steps
  per block against the float block's output, with weights and activations fake-quantized;
  ``fsbr = false`` turns all smoothing off.
- **Weights**: symmetric per output channel, ``w_bits`` (8 or 4), by the shared GPTQ (one group
  spanning K) or round-to-nearest; the scale becomes a dyadic m / 2^k per channel (``wm``,
  ``wk``), the form DI-MatMul multiplies by.
- **Activations**: per token, symmetric, ``a_bits`` (8 or 4), dynamic: what the runtime's DI-Norm
  and requantizations produce; calibration runs the next layers through that quantizer.  Each
  linear's input range is the token's max |x| times ``act_clip`` (c in [1/2, 1], applied as the
  integer round(c * 2^16) / 2^16; 0.9 in illm-w4a4): the few values beyond saturate, the levels
  sit closer.  FSBR's reconstruction and GPTQ's calibration see the same clipped activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qconvert.errors import QConvertError
from qconvert.formats.packing import pack_int4, pad_columns
from qconvert.layouts.illm import to_dyadic
from qconvert.methods.base import Method, QuantizedLinear, check_solver_params, relative_weight_error
from qconvert.methods.fsbr import expand_v, Factors, refine, smoothed_params
from qconvert.online_hadamard import has_online
from qconvert.solvers.gptq import gptq, relative_output_error
from qconvert.solvers.grids import IntGrid, clip_factors
from qconvert_kernels.illm import reference as ri


@dataclass(frozen=True)
class ILLMConfig:
    w_bits: int = 8
    a_bits: int = 8
    fsbr: bool = True  # smoothing of all activation -> weight pairs (SmoothQuant init, then refined)
    alpha: float = 0.5  # migration strength of the smoothing's initialisation
    fsbr_steps: int = 32  # block-reconstruction optimizer steps per block (0: the initialisation alone)
    fsbr_batch: int = 1  # calibration sequences per step
    fsbr_lr: float = 2e-2  # Adam's step on log s
    base: str = "gptq"
    clip_min: float = 1.0  # weight range search (diag-H weighted); 1: off
    damp: float = 0.01
    act_order: bool = True
    act_clip: float = 1.0  # each linear's per-token input range: max |x| times this (1: none)

    def __post_init__(self):
        if self.w_bits not in (4, 8) or self.a_bits not in (4, 8):
            raise QConvertError(f"i-llm: w_bits={self.w_bits!r} and a_bits={self.a_bits!r} must be 4 or 8")
        if not isinstance(self.fsbr, bool):
            raise QConvertError("i-llm: fsbr must be true or false")
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise QConvertError(f"i-llm: alpha={self.alpha!r} must be in [0, 1]")
        for name, lo, hi in (("fsbr_steps", 0, 10000), ("fsbr_batch", 1, 1024)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
                raise QConvertError(f"i-llm: {name}={v!r} must be an integer in [{lo}, {hi}]")
        if not (isinstance(self.fsbr_lr, (int, float)) and 0 < self.fsbr_lr <= 1):
            raise QConvertError(f"i-llm: fsbr_lr={self.fsbr_lr!r} must be in (0, 1]")
        check_solver_params("i-llm", self.base, self.damp, self.clip_min, self.act_order)
        if not ri.valid_clip(self.act_clip):
            raise QConvertError(f"i-llm: act_clip={self.act_clip!r} must be a number in [0.5, 1]; 1 turns clipping off")

    @property
    def layout(self) -> str:
        return f"illm-w{self.w_bits}a{self.a_bits}"

    def grid(self) -> IntGrid:
        return IntGrid(self.w_bits, clip_factors(self.clip_min))


def dyadic_scales(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float scales -> (wm int32 [N], wk int32 [N]) with scale ~= wm / 2^wk, wm 16-bit."""
    d = to_dyadic(scale)
    return d.m.to(torch.int32), d.k.to(torch.int32)


def col_max(*linears) -> torch.Tensor:
    """max |W[:, c]| over the rows of all ``linears`` (which share their input), per input channel."""
    return torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(dim=0)


def smoothing(act_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α) per channel (1 where either is 0)."""
    a, w = act_amax.double(), w_amax.double()
    s = a.clamp_min(1e-8).pow(alpha) / w.clamp_min(1e-8).pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(1e-4, 1e4).float()


class ILLMMethod(Method):
    """Method plugin ``i-llm`` (presets illm-w8a8, illm-w4a8, illm-w4a4)."""

    name = "i-llm"
    config_class = ILLMConfig
    needs_calibration = True  # smoothing statistics and GPTQ

    def __init__(self, params: dict):
        super().__init__(params)
        self._smooth: dict[str, torch.Tensor] = {}  # input smoothing folded into each layer
        self._out_smooth: dict[str, torch.Tensor] = {}  # output smoothing folded into its rows (v, up)
        self._fsbr_stats: dict[str, dict] = {}  # block prefix -> the reconstruction's losses

    def describe(self) -> dict:
        cfg = self.config
        return {**asdict(cfg), "weights": {"bits": cfg.w_bits, "symmetric": True, "granularity": "per-channel",
                                           "scales": "dyadic m / 2^k"},
                "activations": {"bits": cfg.a_bits, "symmetric": True, "granularity": "per-token", "dynamic": True,
                                "integer_only": True, "clip": cfg.act_clip}}

    def check_config(self, config) -> None:
        from qconvert.layouts.illm import check_integer_runtime_config

        check_integer_runtime_config(config)

    def activation_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        qmax = (1 << (self.config.a_bits - 1)) - 1
        xf = x.float()
        amax = xf.abs().amax(dim=-1, keepdim=True) * ri.clip_of(self.config.act_clip)
        inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
        return (torch.round(xf * inv).clamp(-qmax, qmax) * (amax / qmax)).to(x.dtype)

    # ------------------------------------------------------------------ smoothing (before stage A)
    @torch.no_grad()
    def prepare_block(self, prefix: str, block, feed) -> dict[str, torch.Tensor]:
        """Smooth the block in place from a float pass over the calibration inputs (``feed()``
        yields (hidden, kwargs) batches); returns the changed non-linear parameters (the norm
        weights) by full name, for the pipeline to write instead of the source's."""
        attn, mlp = block.self_attn, block.mlp
        names = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
                 "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
        if any(getattr(m, "bias", None) is not None for m in names.values()):
            raise QConvertError("i-llm: linears with a bias are not supported by the integer runtime")
        full = {k: f"{prefix}{'self_attn' if k in ('q', 'k', 'v', 'o') else 'mlp'}.{m}"
                for k, m in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj"),
                             ("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))}
        if not self.config.fsbr:
            for k, lin in names.items():
                self._smooth[full[k]] = torch.ones(lin.in_features, device=lin.weight.device)
            return {}
        amax: dict[str, torch.Tensor] = {}

        def track(key):
            def hook(mod, args, out=None):
                x = (args[0] if out is None else out).detach()
                cur = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
                amax[key] = torch.maximum(amax[key], cur) if key in amax else cur
            return hook

        hooks = [attn.q_proj.register_forward_pre_hook(track("ln1")), mlp.gate_proj.register_forward_pre_hook(track("ln2")),
                 mlp.down_proj.register_forward_pre_hook(track("act")),
                 attn.v_proj.register_forward_hook(lambda m, a, y: track("v")(m, a, y))]
        batches = []
        try:
            for hidden, kwargs in feed():
                block(hidden, **kwargs)
                batches.append((hidden, kwargs))
        finally:
            for h in hooks:
                h.remove()
        a = self.config.alpha
        d = self._head_dim(block)
        kv_out = attn.v_proj.out_features
        reps = attn.o_proj.in_features // kv_out  # query heads per KV head (GQA)
        o_cols = attn.o_proj.weight.abs().amax(dim=0)  # [heads * d]
        # --rotate hadamard+online: down_proj reads (a / s4) Q, and its weight holds W Q already, so
        # a smoothing of a cannot be folded (it acts before Q): s4 stays 1; Q flattens a instead
        online = has_online(mlp.down_proj)
        f = Factors(s1=smoothing(amax["ln1"], col_max(attn.q_proj, attn.k_proj, attn.v_proj), a),
                    s2=smoothing(amax["v"], o_cols.reshape(kv_out // d, reps, d).amax(dim=1).reshape(-1), a),
                    s3=smoothing(amax["ln2"], col_max(mlp.gate_proj, mlp.up_proj), a),
                    s4=torch.ones_like(amax["act"]) if online else smoothing(amax["act"], col_max(mlp.down_proj), a))
        cfg = self.config
        if cfg.fsbr_steps:
            f, stats = refine(block, batches, f, w_bits=cfg.w_bits, a_bits=cfg.a_bits, head_dim=d, reps=reps,
                              steps=cfg.fsbr_steps, batch=cfg.fsbr_batch, lr=cfg.fsbr_lr,
                              frozen=("s4",) if online else (), a_clip=ri.clip_of(cfg.act_clip))
            self._fsbr_stats[prefix] = stats
        del batches
        for name, value in smoothed_params(block, f, d, reps).items():
            block.get_parameter(name).copy_(value)
        s2_o = expand_v(f.s2, d, reps)
        for k in ("q", "k", "v"):
            self._smooth[full[k]] = f.s1
        for k in ("gate", "up"):
            self._smooth[full[k]] = f.s3
        self._smooth[full["o"]] = s2_o
        self._smooth[full["down"]] = f.s4
        self._out_smooth[full["v"]] = f.s2
        self._out_smooth[full["up"]] = f.s4
        return {f"{prefix}input_layernorm.weight": block.input_layernorm.weight.detach().clone(),
                f"{prefix}post_attention_layernorm.weight": block.post_attention_layernorm.weight.detach().clone()}

    @staticmethod
    def _head_dim(block) -> int:
        d = getattr(block.self_attn, "head_dim", None)
        if d is None:
            raise QConvertError("i-llm: the attention module does not say its head_dim")
        return int(d)

    # ------------------------------------------------------------------ weights
    def quantize_linears(self, names: list[str], weights: list[torch.Tensor], hessian: torch.Tensor,
                         input_amax: torch.Tensor | None = None) -> list[QuantizedLinear]:
        cfg = self.config
        k = weights[0].shape[1]
        stacked = torch.cat([w.float() for w in weights])
        grid = cfg.grid()
        if cfg.base == "gptq":
            res = gptq(stacked, hessian, grid, k, damp=cfg.damp, act_order=cfg.act_order)
            q_all, s_all, secs = res.q, res.scales[:, 0], res.seconds
        else:
            diag = torch.diagonal(hessian)
            s_all = grid.scales(stacked, torch.where(diag > 0, diag, torch.ones_like(diag)))
            q_all = grid.quantize(stacked, s_all[:, None]).to(torch.int8)
            secs = 0.0
        wm, wk = dyadic_scales(s_all)
        s_run = wm.double() / torch.pow(2.0, wk.double())  # the scales the runtime applies
        out, row = [], 0
        for name, w in zip(names, weights):
            n = w.shape[0]
            q = q_all[row: row + n]
            deq = (q.double() * s_run[row: row + n, None]).float()
            tensors = {"qweight": pack_int4(pad_columns(q, 2)) if cfg.w_bits == 4 else q.contiguous(),
                       "shape": torch.tensor([n, k], dtype=torch.int64, device="cpu"),
                       "wm": wm[row: row + n].contiguous(), "wk": wk[row: row + n].contiguous(),
                       "smooth": self._smooth.get(name, torch.ones(k, device=w.device)).float().contiguous(),
                       "out_smooth": self._out_smooth.get(name, torch.ones(n, device=w.device)).float().contiguous()}
            info = {"layout": cfg.layout, "shape": [n, k], "bits": cfg.w_bits, "base": cfg.base, "fsbr": cfg.fsbr,
                    "gptq_seconds": round(secs * n / stacked.shape[0], 4), "solved_with": len(names),
                    "gptq_loss": relative_output_error(w.float(), deq, hessian),
                    "weight_error": relative_weight_error(w.float(), deq)}
            stats = self._fsbr_stats.get(name.rsplit(".", 2)[0] + ".")
            if stats:  # its time goes beside the others (kept out of OUT, which stays reproducible)
                info["fsbr_reconstruction"] = {k: v for k, v in stats.items() if k != "seconds"}
                info["fsbr_seconds"] = stats["seconds"]
            out.append(QuantizedLinear(cfg.layout, tensors, info, deq))
            row += n
        return out
