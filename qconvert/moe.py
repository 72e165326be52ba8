"""Mixture-of-experts blocks with one ``nn.Linear`` per expert projection, named as on disk.

transformers 5 keeps the experts of Mixtral, Qwen2-MoE and Qwen3-MoE fused in two 3-D parameters
(``experts.gate_up_proj`` [E, 2I, H], gate rows first; ``experts.down_proj`` [E, H, I]) and
registers Mixtral's block as ``mlp``.  Checkpoints store one linear per expert projection:

  mixtral    model.layers.i.block_sparse_moe.experts.e.{w1,w3,w2}.weight  (gate, up, down)
             model.layers.i.block_sparse_moe.gate.weight                  (router)
  qwen2_moe  model.layers.i.mlp.experts.e.{gate_proj,up_proj,down_proj}.weight
             model.layers.i.mlp.{gate, shared_expert_gate}.weight         (routers)
             model.layers.i.mlp.shared_expert.{gate,up,down}_proj.weight  (a dense MLP)
  qwen3_moe  as qwen2_moe, without the shared expert and its gate

``unfuse_experts`` rewrites a model to the checkpoint's layout, so that skeleton names are
the stored tensor names one to one and every expert projection is a linear to quantize.

Qwen3-VL-MoE's checkpoints are the exception: its language model (read as ``qwen3_moe``) keeps
each block's experts fused, ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``, in the
published files as [E, H, 2I] and [E, I, H] (input first), in transformers 5's saves as [E, 2I, H]
and [E, H, I].  ``fused_expert_views`` presents them as the per-expert linears above, each read
from its own rows of the file (``ExpertView``); transformers' rule tells the two layouts apart
(a tensor of the in-memory shape is taken as it is, else transposed), so qconvert reads what
transformers reads.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from qconvert.errors import QConvertError
from qconvert.architectures import DECODER_LAYERS


def is_moe(config) -> bool:
    """Whether a transformers config describes a mixture-of-experts model."""
    return bool(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0))


# Routers pick experts; a few quantization steps there re-route tokens: never quantized.  (The
# top-k routers of transformers 5 are not nn.Linear; shared_expert_gate, a [1, H] linear, is.)
ROUTER_PATTERNS = ("*.block_sparse_moe.gate", "*.mlp.gate", "*.shared_expert_gate")


@dataclass(frozen=True)
class ExpertNaming:
    block: str  # the attribute the checkpoint keeps the MoE block under
    gate: str  # act(gate(x)) * up(x), then down
    up: str
    down: str


NAMINGS = {
    "mixtral": ExpertNaming(block="block_sparse_moe", gate="w1", up="w3", down="w2"),
    "qwen2_moe": ExpertNaming(block="mlp", gate="gate_proj", up="up_proj", down="down_proj"),
    "qwen3_moe": ExpertNaming(block="mlp", gate="gate_proj", up="up_proj", down="down_proj"),
}


def is_router(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in ROUTER_PATTERNS)


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its linears under the checkpoint's names."""

    def __init__(self, naming: ExpertNaming, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.names = (naming.gate, naming.up, naming.down)
        for name, linear in zip(self.names, (gate, up, down)):
            self.add_module(name, linear)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """The experts of one MoE block as ``ExpertMLP`` children ``0 .. E-1``.

    ``forward`` is the eager forward of transformers' fused ``*Experts`` modules, expert by
    expert in ascending order: each routed token's output, times its routing weight (the
    product in the weights' dtype, float32 for Mixtral), is added into a zero tensor of the
    hidden dtype.  Index ``E`` is the expert-parallel "no expert" sentinel and is skipped.

    ``last_counts`` (int64 [E]) holds how many tokens each expert received in the latest
    forward, ``total_counts`` the sum since construction or ``reset_counts()``.
    """

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.last_counts: torch.Tensor | None = None
        self.total_counts = torch.zeros(self.num_experts, dtype=torch.int64)

    @property
    def experts(self) -> list[ExpertMLP]:
        """The experts in index order (this module is their list: ``self[e]`` works too)."""
        return list(self)

    def token_counts(self, top_k_index: torch.Tensor) -> torch.Tensor:
        """Tokens routed to each expert (int64 [E], on CPU); top-k picks an expert once per token."""
        flat = top_k_index.reshape(-1).to("cpu", torch.int64)
        return torch.bincount(flat, minlength=self.num_experts + 1)[: self.num_experts]

    def reset_counts(self) -> None:
        self.last_counts = None
        self.total_counts = torch.zeros(self.num_experts, dtype=torch.int64)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states [T, H]; top_k_index int64 [T, K]; top_k_weights [T, K]
        counts = self.token_counts(top_k_index)
        self.last_counts = counts
        self.total_counts = self.total_counts + counts
        out = torch.zeros_like(hidden_states)
        by_slot = top_k_index.t()  # [K, T]: tokens ordered by top-k slot, then position, as in transformers
        for e in counts.nonzero().flatten().tolist():
            slot, token = torch.where(by_slot == e)
            y = self[e](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _is_fused(experts) -> bool:
    return isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter) and experts.gate_up_proj.dim() == 3


def _split(fused: nn.Module, naming: ExpertNaming) -> UnfusedExperts:
    """Per-expert linears from the 3-D parameters: on their device, meta stays meta, values exact."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    if not getattr(fused, "is_concatenated", True) or getattr(fused, "is_transposed", False) or getattr(fused, "has_bias", False):
        raise QConvertError(
            f"{type(fused).__name__} stores its experts in a layout qconvert does not know "
            "(interleaved, transposed or with biases); use transformers 5.23, which qconvert is tested with"
        )
    n_exp, two_i, hidden = gate_up.shape
    inter = two_i // 2
    assert tuple(down.shape) == (n_exp, hidden, inter), (tuple(gate_up.shape), tuple(down.shape))

    def linear(weight: torch.Tensor) -> nn.Linear:
        out_f, in_f = weight.shape
        lin = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=weight.dtype)
        value = weight.detach() if weight.is_meta else weight.detach().clone()
        lin.weight = nn.Parameter(value, requires_grad=gate_up.requires_grad)
        return lin

    experts = [
        ExpertMLP(naming, linear(gate_up[e, :inter]), linear(gate_up[e, inter:]), linear(down[e]), fused.act_fn)
        for e in range(n_exp)
    ]
    return UnfusedExperts(experts)


def unfuse_experts(model: nn.Module) -> nn.Module:
    """In place: every fused experts module of the decoder layers becomes an ``UnfusedExperts``,
    and the MoE block moves to the checkpoint's attribute name; a no-op for dense models."""
    try:
        layers = model.get_submodule(DECODER_LAYERS)
    except AttributeError:
        return model
    for layer in layers:
        block = getattr(layer, "mlp", None)
        if block is None or not _is_fused(getattr(block, "experts", None)):
            continue
        model_type = getattr(model.config, "model_type", None)
        naming = NAMINGS.get(model_type)
        if naming is None:
            raise QConvertError(f"model type {model_type!r} has fused experts whose checkpoint names qconvert does not know")
        block.experts = _split(block.experts, naming)
        if naming.block != "mlp":
            # The checkpoint's name in the module tree (state_dict, named_*), while the layer's
            # forward still reads ``self.mlp``: a plain attribute, unseen by nn.Module bookkeeping.
            del layer._modules["mlp"]
            layer.add_module(naming.block, block)
            object.__setattr__(layer, "mlp", block)
    return model


FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")


@dataclass(frozen=True)
class ExpertView:
    """One expert projection's [out, in] weight inside a fused 3-D checkpoint tensor."""

    tensor: str  # the fused tensor, under the checkpoint's name
    expert: int
    half: int | None  # gate_up_proj: 0 the gate's rows, 1 the up's; down_proj: None
    transposed: bool  # stored input first (the published layout)
    shape: tuple[int, int]

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The weight from ``rows``, the fused tensor's rows ``expert .. expert + 1``."""
        w = rows[0].t() if self.transposed else rows[0]
        if self.half is not None:
            w = w[self.half * self.shape[0]:(self.half + 1) * self.shape[0]]
        return w.contiguous()


def fused_expert_views(name: str, stored: str, shape: tuple[int, ...], config) -> dict[str, ExpertView] | None:
    """The per-expert views of fused tensor ``name`` (text-model name; ``stored``: the checkpoint's)
    of shape ``shape``, under qwen3_moe's per-expert names; None where ``name`` is no fused tensor."""
    m = FUSED_EXPERTS.fullmatch(name)
    if m is None:
        return None
    experts, kind = m.groups()
    n_exp, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
    out_in = (2 * inter, hidden) if kind == "gate_up_proj" else (hidden, inter)
    if tuple(shape) == (n_exp, *out_in):
        transposed = False
    elif tuple(shape) == (n_exp, *out_in[::-1]):
        transposed = True
    else:
        raise QConvertError(
            f"fused experts '{stored}' have shape {list(shape)}; {n_exp} experts of hidden size {hidden} and "
            f"moe_intermediate_size {inter} need {[n_exp, *out_in]} or {[n_exp, *out_in[::-1]]}: check config.json")
    views = {}
    for e in range(n_exp):
        if kind == "down_proj":
            views[f"{experts}.{e}.down_proj.weight"] = ExpertView(stored, e, None, transposed, (hidden, inter))
        else:
            for half, proj in enumerate(("gate_proj", "up_proj")):
                views[f"{experts}.{e}.{proj}.weight"] = ExpertView(stored, e, half, transposed, (inter, hidden))
    return views


def experts_of(module: nn.Module) -> list[tuple[str, ExpertMLP]]:
    """(name relative to ``module``, expert) of every expert under ``module`` (a layer or a block)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, ExpertMLP)]
