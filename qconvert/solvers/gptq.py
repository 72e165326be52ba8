"""GPTQ (Frantar et al., 2022): the one weight solver every method shares.

Given a linear layer's weight W [N, K] and the Hessian of its layer-wise loss, H = 2 XᵀX / n
over the calibration inputs X, GPTQ quantizes W one input column at a time and spreads each
column's rounding error over the columns not yet quantized, in proportion to H⁻¹:

    e      = (w_i - q(w_i)) / [H⁻¹]_ii
    W[:, j] -= e · [H⁻¹]_ij           for every later column j

The solver never knows what a quantization level is: a *grid* object (``IntGrid`` here;
FP4 and int8 grids plug in the same way) chooses each group's scale and rounds a column.

What this implementation does, and the choices behind it:

- dampening: λ = ``damp`` · mean(diag H) is added to the diagonal (1% by default);
- dead channels (diag H = 0: an input never seen active) are set to weight 0, and H_ii = 1;
- act-order: columns are processed by decreasing diag H, the channels that matter most first;
- groups stay in **channel order** (no permutation is stored, the runtime never gathers):
  column k belongs to group k // group_size whatever order it is processed in.  A group's
  scale is chosen when the first of its columns is reached, from the group's weights *as
  updated by then* (the static-groups option of the reference takes them from the original
  W instead; choosing later lets the scale see the error already pushed into the group);
- scale choice: the grid's range search, weighting each column by diag H (``IntGrid.clip``);
- lazy blocked updates: error is applied inside a block of ``block_size`` columns at once
  and to the rest of the matrix once per block (one GEMM), as in the reference;
- the inverse comes from a Cholesky factorisation: U = chol(H⁻¹) upper, so row i of U holds
  exactly the [H⁻¹] coefficients the step above needs after the previous columns are gone.

Rows are independent given H, so layers that read the same input (q/k/v, gate/up) are solved
together as one stacked matrix: identical results, one pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qconvert.errors import QConvertError
from qconvert.solvers.grids import IntGrid


@dataclass
class GPTQResult:
    q: torch.Tensor  # int8 [N, K] levels, channel order
    scales: torch.Tensor  # float32 [N, G]
    w_hat: torch.Tensor  # float32 [N, K]: the weight as quantized (the kept columns as updated)
    seconds: float
    dead: int  # input channels with no calibration signal
    kept: torch.Tensor | None = None  # float32 [N, keep_last]: the full-precision columns as updated
    zeros: torch.Tensor | None = None  # float32 [N, G] integer zero points (a ``ZeroPointGrid``): W ~= s · (q - z)


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """‖(W - Ŵ) X‖² / ‖W X‖² written with H ∝ XᵀX (the scale of H cancels)."""
    e = w - w_hat
    num = ((e @ h) * e).sum()
    den = ((w @ h) * w).sum()
    return float(num / den) if float(den) > 0 else 0.0


def asymmetric_target(weight: torch.Tensor, hessian: torch.Tensor, shift: torch.Tensor, alpha: float,
                      damp: float = 0.01) -> torch.Tensor:
    """The weight GPTQ should quantize for asymmetric calibration (GPTAQ, Li et al., ICML 2025).

    Symmetric calibration quantizes W to reproduce W X on the *quantized* model's input X.  The
    float model computes W X_f, and the quantized layer should rather match that:
    min_Q ‖X_f Wᵀ - X Qᵀ‖².  Its unconstrained minimizer is W* = W X_fᵀX (XᵀX)⁻¹ = W + W ΔᵀX (XᵀX)⁻¹
    with Δ = X_f - X, and ‖X_f Wᵀ - X Qᵀ‖² = ‖X (W* - Q)ᵀ‖² + a constant, so GPTQ on W* with the
    usual H solves it.  ``shift`` = 2 ΔᵀX / rows is on H's scale; H gets the solver's dampening
    (a ridge regression); ``alpha`` shrinks the correction (GPTAQ's code defaults to 0.25):

        W* = W + α · W · shift · (H + λI)⁻¹
    """
    w = weight.detach().float()
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    u = _inverse_cholesky_upper(h)  # UᵀU = (H + λI)⁻¹
    del h
    return w + alpha * (((w @ shift.float()) @ u.T) @ u)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: IntGrid, group_size: int, *,
         damp: float = 0.01, act_order: bool = True, block_size: int = 128, keep_last: int = 0) -> GPTQResult:
    """Quantize ``weight`` [N, K] against ``hessian`` [K, K]; see the module docstring.

    ``keep_last``: the last ``keep_last`` columns stay in full precision (QUIK's outlier
    channels): they are processed after all the others, so that they absorb the error of every
    quantized column, and come back updated in ``kept`` (their levels and scales are 0).

    ``seconds`` is the solve alone; ``relative_output_error(W, result.w_hat, H)`` measures it.

    Runs on one CPU thread: the column loop is thousands of small operations, which a
    thread pool only slows down (measured: 0.5 s on one thread, 15 s on two with the
    second core busy, for a 576 x 1536 layer).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, hessian, grid, group_size, damp, act_order, block_size, keep_last)
    finally:
        torch.set_num_threads(threads)


def _gptq(weight, hessian, grid, group_size, damp, act_order, block_size, keep_last=0) -> GPTQResult:
    t0 = time.perf_counter()
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise QConvertError(f"GPTQ: Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    if not 0 <= keep_last < k:
        raise QConvertError(f"GPTQ: keep_last={keep_last} must leave at least one of the {k} columns to quantize")
    if keep_last and grid.zero_points:
        raise QConvertError("GPTQ: full-precision columns (keep_last) are for symmetric grids, whose level 0 is weight 0")
    kq = k - keep_last  # columns kq.. stay in full precision
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    importance = torch.diagonal(h).clone()  # per input channel, for the range search

    dev = w.device
    perm = (torch.argsort(torch.diagonal(h)[:kq], descending=True, stable=True) if act_order
            else torch.arange(kq, device=dev))
    perm = torch.cat([perm, torch.arange(kq, k, device=dev)])  # the kept columns last, in their order
    inv_perm = torch.argsort(perm)
    w = w[:, perm]
    h = h[perm][:, perm]
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    u = _inverse_cholesky_upper(h)
    del h  # K x K: on a GPU, room for the next layer's

    n_groups = -(-k // group_size)
    scales = torch.zeros(n, n_groups, device=dev)
    zeros = torch.zeros(n, n_groups, device=dev) if grid.zero_points else None
    have = [False] * n_groups  # host-side: read once per column, never a device sync
    group_of = (perm // group_size).tolist()
    # the loop works on Wᵀ [K, N]: a column of W is a contiguous row here
    wt = w.T.contiguous()
    q_t = torch.zeros(k, n, device=dev)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()  # [B, N]
        err1 = torch.zeros(i2 - i1, n, device=dev)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i1 + i >= kq:  # kept: takes the error pushed into it, spreads none
                q_t[i1 + i] = w1[i]
                continue
            g = group_of[i1 + i]
            if not have[g]:
                chosen = _group_scale(grid, g, group_size, k, inv_perm, wt, w1, err1[:i], u, i1, i, i2, importance)
                if zeros is None:
                    scales[:, g] = chosen
                else:
                    scales[:, g], zeros[:, g] = chosen
                have[g] = True
            s = scales[:, g]
            if zeros is None:
                q = grid.quantize(w1[i], s)
                deq = q * s
            else:
                q = grid.quantize(w1[i], s, zeros[:, g])
                deq = (q - zeros[:, g]) * s
            q_t[i1 + i] = q
            e = err1[i]
            torch.div(w1[i] - deq, u1[i, i], out=e)
            w1[i:].addr_(u1[i, i:], e, alpha=-1.0)
        wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)

    q_levels = q_t.T
    kept = q_levels[:, kq:].clone() if keep_last else None
    shifted = q_levels if zeros is None else q_levels - zeros.repeat_interleave(group_size, dim=1)[:, :k][:, perm]
    w_hat = shifted * scales.repeat_interleave(group_size, dim=1)[:, :k][:, perm]
    if keep_last:
        w_hat[:, kq:] = kept
        q_levels[:, kq:] = 0
    q_levels = q_levels[:, inv_perm]
    w_hat = w_hat[:, inv_perm]
    seconds = time.perf_counter() - t0
    return GPTQResult(q_levels.to(torch.int8), scales, w_hat, seconds, int(dead.sum()), kept=kept, zeros=zeros)


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """U upper with UᵀU = H⁻¹; retries with more dampening if H is not positive definite."""
    extra = float(torch.diagonal(h).mean()) * 1e-3
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            del lower  # K x K each: at most three alive at once (h, hinv, upper)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0:
                return upper
        h = h.clone()
        h.diagonal().add_(extra * 10**attempt)
    raise QConvertError("GPTQ: the Hessian stays singular after dampening; raise the damp parameter (e.g. 0.1)")


def _group_scale(grid, g, group_size, k, inv_perm, wt, w1, err_done, u, i1, i, i2, importance):
    """Scale of group g from its columns' current values (see the module docstring)."""
    cols = torch.arange(g * group_size, min((g + 1) * group_size, k), device=wt.device)
    pos = inv_perm[cols]  # positions in processing order; all >= i1 + i (first touch)
    cur = torch.empty(len(cols), wt.shape[1], device=wt.device)  # the group's columns of W, as rows
    inside = (pos >= i1) & (pos < i2)
    if inside.any():
        cur[inside] = w1[pos[inside] - i1]
    later = pos >= i2
    if later.any():  # not yet updated by this block's lazy batch: apply it for these columns
        cur[later] = wt[pos[later]] - u[i1 : i1 + i, pos[later]].T @ err_done
    if grid.zero_points:
        return grid.params(cur.T, importance[cols])
    return grid.scales(cur.T, importance[cols])
