"""What one decode step of a W4A8 OUT (is-w4a8, w4a8-fs) asks of a GPU, counted on the CPU: the
step a CUDA graph captures (``DecodeEngine``: the new token at a device column, attention over all
``max_len`` columns) with the W4A8 layers on their kernels as ``load(OUT, device="cuda")`` sets
them up (siblings joined, each kernel's copy of the weights prepared), the launches run by the
lane-exact CPU emulator (qconvert_kernels/w4a8/emulate.py).  Counted at the aten level as
benchmarks/illm_step_ops.py does: the torch ops that compute (views left out; allocations,
``aten::empty*``, counted among them and apart, as they launch nothing and a graph fixes their
memory at capture) plus the kernel launches; each of the others is a kernel of the graph.  Seven
forms: the OUT as a GPU load runs it (W4A8 kernels; RMSNorms on the norm kernel: ``qconvert.norms``;
RoPE on the rope kernel: ``qconvert.rope``; silu(gate) * up on the swiglu kernel: ``qconvert.mlp``;
the KV-cache writes on the kvcache kernel: the engine's ``cache_kernel``), the same with only the
norm and rope kernels, with only the norm kernel, with transformers' glue; and the float original
(float16, the same engine) with all four glue kernels (as ``qconvert bench`` times it), with the
norm and rope kernels, and without.  The torch ops left are listed per decoder block: the float
glue (residual adds, attention, and whatever of the norms, RoPE, SwiGLU and cache writes runs as
torch ops) around the GEMMs.

Checks: the step's logits on the emulated kernels equal the same layers' CPU reference path (the
OUT loaded without W4A8 kernels, the norms on their kernel, transformers' RoPE and SwiGLU, the
cache written with index_copy_) for w4a8-is, bit for bit.  (The swiglu kernel's emulator takes
float64 exp rounded to float32 for CUDA's expf, torch's CPU silu its own exp: where the two ever
differed, so would the logits.)

    python benchmarks/w4a8_step_ops.py OUT [--against SOURCE] [--prompt 16] [--batch 1] [--json FILE]

The emulated steps take a few minutes for SmolLM2 on 2 cores; their time is not reported.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from illm_step_ops import OpCount  # noqa: E402

from qconvert.bench import environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


GLUE = ("norm", "rope", "swiglu", "cache")  # the float glue's kernels a GPU load and qconvert bench use


def captured_step(model, ids: torch.Tensor, w4a8: bool, glue=()):
    """Prefill ``ids`` on a ``DecodeEngine``, then one step in the shape a CUDA graph captures
    (``DecodeEngine._capture`` runs ``_step(b, max_len)``), counted: (logits, OpCount, launches per
    kernel).  ``w4a8``: the W4A8 launches run on their emulator; ``glue``, the float glue on its
    kernels, emulated: "norm" the RMSNorms, "rope" the attention layers' RoPE, "swiglu" the MLPs'
    silu(gate) * up (``qconvert.runtime.use_glue_kernels``, as a GPU load and ``qconvert bench`` set
    them), "cache" the engine's KV-cache writes (its ``cache_kernel``, on by default on a GPU)."""
    import contextlib

    from qconvert.engine import DecodeEngine
    from qconvert.runtime import use_glue_kernels
    from qconvert_kernels.kvcache import emulate as kv_emulate
    from qconvert_kernels.norm import emulate as norm_emulate
    from qconvert_kernels.rope import emulate as rope_emulate
    from qconvert_kernels.swiglu import emulate as swiglu_emulate
    from qconvert_kernels.w4a8 import emulate

    emulators = {"norm": norm_emulate, "rope": rope_emulate, "swiglu": swiglu_emulate, "cache": kv_emulate}
    use_glue_kernels(model, "cpu", [g for g in glue if g != "cache"])  # the cache kernel is the engine's
    b, p = ids.shape
    counter = OpCount()
    outer = emulate.emulating(sm_count=132) if w4a8 else contextlib.nullcontext()
    nested = contextlib.ExitStack()
    with torch.inference_mode(), outer as w4, nested:
        emus = [w4] if w4a8 else []
        emus += [nested.enter_context(emulators[g].emulating()) for g in GLUE if g in glue]
        eng = DecodeEngine(model, b, p + 2, graphs=False, cache_kernel="cache" in glue)
        nxt = eng.prefill(ids).argmax(-1)
        before = [len(e.launches) for e in emus]
        eng._ids[:b].copy_(nxt.reshape(b, 1))  # what decode() does before the step it replays
        eng.cache.seen = eng.length
        with counter:
            logits = eng._step(b, eng.max_len).clone()
    launches = collections.Counter(name for e, k in zip(emus, before) for name, *_ in e.launches[k:])
    return logits, counter, launches


def on_kernels(out: Path):
    """The OUT in float16 on the CPU, set up as ``load(OUT, device="cuda")`` sets it up on a GPU:
    siblings joined, every W4A8 layer's kernel copy prepared (here on the CPU: the emulator's)."""
    from qconvert import load
    from qconvert.layouts.int4 import W4A8Linear
    from qconvert.runtime import fuse_siblings

    model = load(out, dtype=torch.float16)
    groups = fuse_siblings(model)
    lins = [m for m in model.modules() if isinstance(m, W4A8Linear)]
    for m in lins:
        m.prepare_cuda(torch.device("cpu"))
    return model, groups, lins


def row(name: str, counter: OpCount, launches: collections.Counter, blocks: int) -> dict:
    torch_ops = counter.computing
    return {"form": name, "torch_ops": torch_ops, "allocations": counter.allocations, "launches": sum(launches.values()),
            "kernels": torch_ops - counter.allocations + sum(launches.values()), "host_reads": counter.reads,
            "per_kernel": dict(launches),
            "torch_ops_by_name": {k: v for k, v in counter.ops.most_common() if not k.startswith("aten::empty")},
            "torch_ops_per_block": round((torch_ops - counter.allocations) / blocks, 1)}


def name_of(layouts: list[str]) -> str:
    return "+".join(layouts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="an OUT quantized with is-w4a8, is-w4a8-rtn or w4a8-fs")
    ap.add_argument("--against", help="the float original (default: the source qconvert.json names)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row (random ids)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "w4a8_step_ops.json")
    args = ap.parse_args()

    from qconvert import load
    from qconvert.source import resolve_source
    from qconvert.verify import recorded_source

    model, groups, lins = on_kernels(args.out)
    layouts = sorted({m.layout for m in lins})
    if not lins or set(layouts) - {"w4a8-is", "w4a8-fs"}:
        raise SystemExit(f"{args.out}: no W4A8 (w4a8-is / w4a8-fs) layers to count ({layouts})")
    blocks = model.config.num_hidden_layers
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    got, q_count, q_launches = captured_step(model, ids, w4a8=True, glue=GLUE)
    # the same layers on their CPU reference path (no kernel copy, no join), the norms on the kernel
    # (its own rounding), the rest of the glue transformers' and index_copy_
    plain = load(args.out, dtype=torch.float16)
    want, _, _ = captured_step(plain, ids, w4a8=False, glue=("norm",))
    exact = torch.equal(got, want)
    if layouts == ["w4a8-is"] and not exact:
        raise SystemExit("the step on the emulated kernels differs from the reference path: a kernel bug")
    rows = [row(f"{name_of(layouts)}, W4A8, norm, rope, swiglu and cache kernels (GPU load)", q_count, q_launches, blocks)]
    for glue, label in ((("norm", "rope"), "W4A8, norm and rope kernels (before the swiglu and cache kernels)"),
                        (("norm",), "W4A8 and norm kernels, transformers' RoPE"),
                        ((), "W4A8 kernels, transformers' norms and RoPE")):
        model, _, _ = on_kernels(args.out)
        _, count, launches = captured_step(model, ids, w4a8=True, glue=glue)
        rows.append(row(f"{name_of(layouts)}, {label}", count, launches, blocks))
    against = args.against or recorded_source(args.out)
    src = resolve_source(against)
    for glue, label in ((GLUE, "norm, rope, swiglu and cache kernels (qconvert bench)"),
                        (("norm", "rope"), "norm and rope kernels (before)"), ((), "transformers' glue")):
        fp = src.load_model(torch.float16).eval()
        _, count, launches = captured_step(fp, ids, w4a8=False, glue=glue)
        rows.append(row(f"float16 original, {label}", count, launches, blocks))

    env = environment(torch.device("cpu"))
    print(f"{args.out.name}: one captured decode step of batch {args.batch} after {args.prompt} prompt tokens, "
          f"{blocks} blocks, {len(lins)} W4A8 layers ({len(groups)} joined groups) ({env['device']})")
    print(f"{'form':80s} {'torch ops':>9s} {'allocs':>7s} {'launches':>8s} {'kernels':>8s} {'torch ops/block':>15s}")
    for r in rows:
        print(f"{r['form']:80s} {r['torch_ops']:9d} {r['allocations']:7d} {r['launches']:8d} {r['kernels']:8d} "
              f"{r['torch_ops_per_block']:15.1f}")
    print("  launches:", ", ".join(f"{k} {v}" for k, v in sorted(q_launches.items())))
    print("  torch ops of the quantized step, per block:",
          ", ".join(f"{k.removeprefix('aten::')} {v / blocks:.1f}" for k, v in rows[0]["torch_ops_by_name"].items()))
    print(f"same logits as the reference path, bit for bit: {exact}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"out": str(args.out), "against": str(against), "prompt": args.prompt,
                                     "batch": args.batch, "blocks": blocks, "layouts": layouts,
                                     "joined_groups": len(groups), "w4a8_layers": len(lins), "rows": rows,
                                     "bit_exact_vs_reference": exact, "environment": env}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
