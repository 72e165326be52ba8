"""Does solving the group scales again after GPTQ lower a layer's output error?  Per linear of the
float SmolLM2-135M (docs/accuracy.md, "Refitting the group scales after GPTQ").

    python benchmarks/gptq_refit.py [--blocks 0,5,15,25,29] [--windows 16] [--json F]

The inputs of q_proj, o_proj, gate_proj and down_proj of the named blocks are captured as
``quik_outlier_select.py`` does (C4 excerpt, ``--windows`` x 512 tokens, seed 0); H = XᵀX.  Each
linear is quantized by GPTQ (int4 g128, act-order, damp 0.01, range search down to 0.7) on the
symmetric grid and on the zero-point grid, then its group scales are solved again for the levels
GPTQ chose (``refit_scales`` below), and the figure is the relative output error
||(W - Ŵ) X||² / ||W X||² on the calibration tokens themselves, before and after.  Prints a table
and writes JSON (default benchmarks/results/gptq_refit.json).  A probe for docs/accuracy.md, not a
product path: the refit lowered every layer's error by 1-2 % but not the perplexity, so qconvert
does not ship it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memory import git_commit
from quik_outlier_select import capture
from qconvert.formats.packing import pad_columns
from qconvert.methods.integer_scale import _dequantize
from qconvert.solvers.gptq import gptq, relative_output_error
from qconvert.solvers.grids import IntGrid, ZeroPointGrid, clip_factors
from qconvert.solvers.rtn import FP16_TINY

ROOT = Path(__file__).resolve().parent.parent
GRIDS = {"symmetric": IntGrid(4, clip_factors(0.7)), "zero-point": ZeroPointGrid(4, clip_factors(0.7))}


def refit_scales(target: torch.Tensor, hessian: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor,
                 group_size: int, chunk_elems: int = 2**25) -> torch.Tensor:
    """Group scales [N, G] solved again for fixed levels: each row's least squares against the full H.

    With the levels c [N, K] fixed (zero points already subtracted), a row's quantized weight is
    Ŵ = Σ_g s_g c_g, linear in its G scales, so the layer loss (w - Ŵ) H (w - Ŵ)ᵀ is a quadratic
    in s: minimal at A s = b with A[g, h] = c_gᵀ H_gh c_h and b[g] = c_gᵀ (H w)_g.  GPTQ picked
    each scale before the error of the columns after it was known; this picks them knowing every
    level.  A ridge of 1e-4 · diag(A) towards the old scales keeps a group with all levels 0 where
    it was; each new scale is rounded to fp16, and a row keeps its old scales unless its loss
    (at the fp16 scales) is lower, so the loss never rises.  Cost: about N · K² multiply-adds, as
    GPTQ's.
    """
    n, k = target.shape
    g_count = scales.shape[1]
    kp = g_count * group_size
    h = torch.zeros(kp, kp, device=target.device)
    h[:k, :k] = hessian.float()
    h_blocks = h.reshape(g_count, group_size, kp)
    out = scales.clone()
    rows = max(1, chunk_elems // (g_count * kp))
    for r0 in range(0, n, rows):
        c = torch.zeros(min(rows, n - r0), kp, device=target.device)
        c[:, :k] = levels[r0 : r0 + rows]
        w = torch.zeros_like(c)
        w[:, :k] = target[r0 : r0 + rows]
        cg = c.reshape(len(c), g_count, group_size)
        p = torch.einsum("ngi,gij->ngj", cg, h_blocks)  # [n, G, Kp]: c_gᵀ H_g·
        a = (p.reshape(len(c), g_count, g_count, group_size) * cg[:, None]).sum(-1).double()  # [n, G, G]
        b = torch.einsum("ngj,nj->ng", p, w).double()
        old = scales[r0 : r0 + rows].double()
        reg = 1e-4 * torch.diagonal(a, dim1=1, dim2=2) + 1e-30
        new = torch.linalg.solve(a + torch.diag_embed(reg), (b + reg * old)[..., None])[..., 0]
        new = new.clamp(FP16_TINY, 65504.0).half().double()

        def loss(s):
            return torch.einsum("ng,ngh,nh->n", s, a, s) - 2 * (b * s).sum(-1)

        better = torch.isfinite(new).all(-1) & (loss(new) < loss(old))
        out[r0 : r0 + rows] = torch.where(better[:, None], new, old).float()
    return out


def refit_w_hat(w: torch.Tensor, h: torch.Tensor, res) -> torch.Tensor:
    """Ŵ of a GPTQ result whose group scales were solved again."""
    k = w.shape[1]
    levels = res.q.float()
    if res.zeros is not None:
        levels = levels - res.zeros.repeat_interleave(128, dim=1)[:, :k]
    scales = refit_scales(w, h, levels, res.scales, 128)
    return _dequantize(pad_columns(res.q, 128), scales, 128, k, res.zeros)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="0,5,15,25,29")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gptq_refit.json"))
    args = ap.parse_args()
    inputs, weights = capture([int(b) for b in args.blocks.split(",")], args.windows)
    rows = []
    cols = [f"{g} {'refit' if r else 'gptq'}" for g in GRIDS for r in (False, True)]
    print(f"{'linear':<16} {'K':>5}  " + "  ".join(f"{c:>16}" for c in cols) + "  sym gain  zp gain")
    for key, x in inputs.items():
        w, h = weights[key], x.double().T @ x.double()
        h = (h / x.shape[0]).float()
        err = {}
        for gname, grid in GRIDS.items():
            res = gptq(w, h, grid, 128)
            err[f"{gname} gptq"] = relative_output_error(w, res.w_hat, h)
            err[f"{gname} refit"] = relative_output_error(w, refit_w_hat(w, h, res), h)
        gains = [1 - err[f"{g} refit"] / err[f"{g} gptq"] for g in GRIDS]
        rows.append({"linear": key, "k": x.shape[1], "tokens": x.shape[0], "relative_error": err,
                     "gain": dict(zip(GRIDS, gains))})
        print(f"{key:<16} {x.shape[1]:>5}  " + "  ".join(f"{v:>16.6f}" for v in err.values())
              + "  " + "  ".join(f"{g:>7.1%}" for g in gains))
    Path(args.json).write_text(json.dumps({"probe": "gptq_refit", "commit": git_commit(),
                                           "windows": args.windows, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
