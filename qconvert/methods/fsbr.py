"""FSBR's block reconstruction (I-LLM, arXiv 2405.17849, section 3.2): the smoothing factors of a
decoder block, refined so that the block *as quantized* reproduces the float block.

The four factor vectors of a Llama block (``Factors``):

    s1 [H]   input norm -> q/k/v       ln1.weight / s1,  W_{q,k,v} * s1 (columns)
    s2 [Dkv] v -> o (per value channel) W_v / s2 (rows),  W_o * s2 (columns, repeated per query head)
    s3 [H]   post-attention norm -> gate/up
    s4 [I]   SwiGLU product -> down     W_up / s4 (rows),  W_down * s4 (columns)

are learned as log s by Adam.  Each step runs the block functionally (``torch.func.functional_call``)
on one minibatch of the calibration inputs, with the smoothed weights fake-quantized per output
channel and every linear's input fake-quantized per token (the runtime's granularities; rounding
passes gradients straight through), and minimizes the mean squared error against the float block's
output on the same inputs.  The refined factors are kept only if they lower that error on a fixed
probe set of minibatches; otherwise the SmoothQuant initialisation stays.  The work is bounded:
``steps`` optimizer steps of ``batch`` sequences per block.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


@dataclass
class Factors:
    s1: torch.Tensor
    s2: torch.Tensor
    s3: torch.Tensor
    s4: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"s1": self.s1, "s2": self.s2, "s3": self.s3, "s4": self.s4}


def expand_v(s2: torch.Tensor, head_dim: int, reps: int) -> torch.Tensor:
    """Per value channel [KV * d] -> per o_proj input column [KV * reps * d] (query head h reads
    value head h // reps)."""
    return s2.reshape(-1, 1, head_dim).expand(-1, reps, -1).reshape(-1)


def smoothed_params(block: nn.Module, f: Factors, head_dim: int, reps: int) -> dict[str, torch.Tensor]:
    """The block's norm and linear weights with the factors folded in (differentiable in f)."""
    attn, mlp = block.self_attn, block.mlp
    s2o = expand_v(f.s2, head_dim, reps)
    return {
        "input_layernorm.weight": block.input_layernorm.weight / f.s1,
        "self_attn.q_proj.weight": attn.q_proj.weight * f.s1,
        "self_attn.k_proj.weight": attn.k_proj.weight * f.s1,
        "self_attn.v_proj.weight": attn.v_proj.weight * f.s1 / f.s2[:, None],
        "self_attn.o_proj.weight": attn.o_proj.weight * s2o,
        "post_attention_layernorm.weight": block.post_attention_layernorm.weight / f.s3,
        "mlp.gate_proj.weight": mlp.gate_proj.weight * f.s3,
        "mlp.up_proj.weight": mlp.up_proj.weight * f.s3 / f.s4[:, None],
        "mlp.down_proj.weight": mlp.down_proj.weight * f.s4,
    }


def fake_quant_rows(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Symmetric round-to-nearest per row (last dim) with a straight-through gradient; the row's
    range is its max |x| times ``clip`` (what lies beyond saturates)."""
    qmax = (1 << (bits - 1)) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) * clip / qmax
    v = x / scale
    return (v + (torch.round(v) - v).detach()).clamp(-qmax, qmax) * scale


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _minibatches(feed, batch: int) -> list[tuple[torch.Tensor, dict]]:
    """Split the calibration batches into minibatches of ``batch`` sequences (keyword tensors that
    carry the batch dimension are split with them)."""
    def cut(v, sl, n):
        if isinstance(v, (tuple, list)):  # e.g. the rotary (cos, sin)
            return type(v)(cut(x, sl, n) for x in v)
        return v[sl] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n > 1 else v

    out = []
    for hidden, kw in feed:
        n = hidden.shape[0]
        for start in range(0, n, batch):
            sl = slice(start, min(start + batch, n))
            out.append((hidden[sl], {k: cut(v, sl, n) for k, v in kw.items()}))
    return out


def _reproducible_attention(device: torch.device):
    """On CUDA, attention by the math backend: the fused kernels' backward passes accumulate with
    atomics (not reproducible run to run); the math one is matmuls and a softmax."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def refine(block: nn.Module, feed, init: Factors, *, w_bits: int, a_bits: int, head_dim: int, reps: int,
           steps: int, batch: int, lr: float, frozen: tuple[str, ...] = (), a_clip: float = 1.0) -> tuple[Factors, dict]:
    """Refine ``init`` on the calibration inputs ``feed`` (list of (hidden, kwargs)); ``block``
    holds the float weights (it is run functionally, not changed); the factors named in
    ``frozen`` keep their initial values.  Returns (factors, stats)."""
    t0 = time.perf_counter()
    data = _minibatches(feed, batch)
    probe = list(range(0, len(data), max(1, len(data) // 4)))[:4]
    goal = {}  # the float block's outputs, for the minibatches used
    with torch.no_grad():
        for i in sorted(set(probe) | {step % len(data) for step in range(steps)}):
            goal[i] = _out(block(data[i][0], **data[i][1])).detach()
    attn, mlp = block.self_attn, block.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    hooks = [lin.register_forward_pre_hook(lambda m, a: (fake_quant_rows(a[0], a_bits, a_clip), *a[1:])) for lin in linears]
    theta = {k: nn.Parameter(v.detach().float().log()) for k, v in init.as_dict().items() if k not in frozen}

    def factors() -> Factors:
        return Factors(**{k: (theta[k].exp() if k in theta else v) for k, v in init.as_dict().items()})

    def loss_on(i: int) -> torch.Tensor:
        f = factors()
        params = {k: (fake_quant_rows(v, w_bits) if k.endswith("proj.weight") else v)
                  for k, v in smoothed_params(block, f, head_dim, reps).items()}
        hidden, kw = data[i]
        y = _out(functional_call(block, params, (hidden,), kw))
        return torch.mean((y.float() - goal[i].float()) ** 2)

    def probe_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_on(i)) for i in probe) / len(probe)

    try:
        with _reproducible_attention(theta["s1"].device):
            before = probe_loss()
            opt = torch.optim.Adam(list(theta.values()), lr=lr)
            with torch.enable_grad():
                for step in range(steps):
                    opt.zero_grad(set_to_none=True)
                    loss = loss_on(step % len(data))
                    loss.backward()
                    opt.step()
            after = probe_loss()
    finally:
        for h in hooks:
            h.remove()
    kept = after < before
    with torch.no_grad():
        out = factors() if kept else init
    return out, {"loss_init": before, "loss_refined": after, "kept": kept, "steps": steps,
                 "seconds": round(time.perf_counter() - t0, 2)}
