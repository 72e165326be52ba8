"""What one decode step of an I-LLM OUT's integer-only model asks of the device: the torch ops
that compute (views left out: on a GPU each is a kernel launch, unless a CUDA graph replays them
all as one; allocations, ``aten::empty*``, are counted among them and also apart, as they launch
nothing) and the reads of a tensor's value back to the host (``bool(t)``, ``int(t)``, ``t.item()``,
``torch.equal``: ``READS``; on a GPU each waits for the device, and a graph cannot
capture it), counted at the aten level, for the two forms of the step:

- eager: the engine's CPU step, which takes cheaper branches after reading values (what a GPU's
  eager step also did before the integer ops became branch-free on CUDA);
- captured shape: the step a CUDA graph captures (``reference.sync_free``, the new token at a
  device column, attention over all ``max_len`` columns), run eagerly on this device.

Both give the same logits (checked).  Also the wall time per step of each on this device.  These
two count the torch integer path.  ``--kernels`` adds the form a GPU runs:

- captured shape on the kernels: the captured step with the I-LLM kernels turned on
  (``IntegerLlama.use_kernels``), the launches run by the CPU emulator (qconvert_kernels/illm/emulate.py):
  the torch ops left plus the kernel launches, per kernel.  Its last step is the one counted and
  emulated (minutes on a CPU; its time is not reported), the earlier ones run the torch path, and
  its logits must equal the captured shape's.

Prints a table and writes JSON.

    python benchmarks/illm_step_ops.py OUT [--prompt 64] [--batch 1] [--steps 5] [--kernels] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qconvert import load
from qconvert.bench import environment

ROOT = Path(__file__).resolve().parents[1]


# the ops that read a value back to the host (inference mode dispatches item / is_nonzero whole,
# outside it they decompose to _local_scalar_dense)
READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal")


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(tree)
            if isinstance(t, torch.Tensor) and t.device.type != "meta"}


class OpCount(TorchDispatchMode):
    """Counts aten ops that compute and host reads.  An op whose schema says its result may alias
    an input (a view, or under ``torch.inference_mode`` an undecomposed ``to``, ``reshape`` or
    ``contiguous``) counts only where its result is new memory: a cast or a copying reshape is a
    kernel, a view is none.  An op on meta tensors only (shape work, e.g. qconvert.rope's layout of
    its outputs) runs no kernel and is not counted."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        schema = func._schema
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if tensors and all(t.device.type == "meta" for t in tensors):
            return out
        if schema.is_mutable or not any(r.alias_info is not None for r in schema.returns):
            self.ops[schema.name] += 1
        elif _storages(out) - _storages((args, kwargs)):
            self.ops[schema.name] += 1
        return out

    @property
    def reads(self) -> int:
        return sum(self.ops[r] for r in READS)

    @property
    def computing(self) -> int:
        return sum(self.ops.values()) - self.reads

    @property
    def allocations(self) -> int:
        """Of ``computing``, the allocations (``aten::empty*``): on a GPU they launch no kernel, and in
        a CUDA graph their memory is fixed at capture, so a replay does nothing for them."""
        return sum(k for op, k in self.ops.items() if op.startswith("aten::empty"))


def steps(model, ids, n: int, wide: bool, count: bool):
    """Prefill ``ids``, then ``n`` greedy steps: (logits per step, seconds per step, OpCount of the last)."""
    b, p = ids.shape
    eng = model.decode_engine(b, p + n + 1)
    eng._wide = wide
    nxt = eng.prefill(ids).argmax(-1)
    out, times, counter = [], [], OpCount()
    for i in range(n):
        t0 = time.perf_counter()
        if count and i == n - 1:
            with counter:
                logits = eng.decode(nxt)
        else:
            logits = eng.decode(nxt)
        times.append(time.perf_counter() - t0)
        out.append(logits.clone())
        nxt = logits.argmax(-1)
    timed = times[1:-1] if count else times[1:]  # the first step warms up; the counted one is slowed by counting
    return torch.stack(out), sum(timed) / max(len(timed), 1), counter


def kernel_steps(model, ids, n: int):
    """``steps`` of the captured shape whose last step runs on the I-LLM kernels, emulated: (its
    logits, the OpCount of the torch ops left, launches per kernel)."""
    from qconvert_kernels.illm import emulate

    b, p = ids.shape
    eng = model.decode_engine(b, p + n + 1)
    eng._wide = True
    nxt = eng.prefill(ids).argmax(-1)
    for _ in range(n - 1):
        nxt = eng.decode(nxt).argmax(-1)
    counter = OpCount()
    model.use_kernels(True)
    try:
        with emulate.emulating() as emu:
            with counter:
                logits = eng.decode(nxt)
            logits = logits.clone()
    finally:
        model.use_kernels(False)
    return logits, counter, collections.Counter(name for name, *_ in emu.launches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="an OUT quantized with an illm-* scheme")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (random ids)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="greedy steps (the first untimed, the last counted)")
    ap.add_argument("--kernels", action="store_true",
                    help="also count the captured step on the I-LLM kernels (emulated on the CPU: minutes)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "illm_step_ops.json")
    args = ap.parse_args()
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3 (a warm-up, a timed and a counted step)")
    model = load(args.out, device="cpu")
    if not hasattr(model, "decode_engine") or not hasattr(model, "forward_int"):
        raise SystemExit(f"{args.out} is not an I-LLM OUT (its model has no integer runtime)")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    rows, logits = {}, {}
    with torch.inference_mode():
        for name, wide in (("eager", False), ("captured shape", True)):
            logits[name], sec, c = steps(model, ids, args.steps, wide, count=True)
            top = [{"op": op, "calls": n} for op, n in c.ops.most_common(8)]
            rows[name] = {"ops": c.computing, "allocations": c.allocations, "host_reads": c.reads, "step_s": round(sec, 4),
                          "top_ops": top}
        if args.kernels:
            last, c, launches = kernel_steps(model, ids, args.steps)
            rows["captured shape on the kernels"] = {
                "ops": c.computing + sum(launches.values()), "allocations": c.allocations, "torch_ops": c.computing,
                "launches": dict(launches),
                "host_reads": c.reads, "step_s": None, "top_ops": [{"op": op, "calls": k} for op, k in c.ops.most_common(8)],
                "same_logits": torch.equal(last, logits["captured shape"][-1])}
    same = torch.equal(logits["eager"], logits["captured shape"])
    scheme = (json.loads((args.out / "qconvert.json").read_text()).get("scheme") or {}).get("name")
    result = {"out": str(args.out), "scheme": scheme, "batch": args.batch, "prompt_tokens": args.prompt,
              "blocks": model.layers_n, "steps": args.steps, "forms": rows, "same_logits": same,
              "environment": environment(torch.device("cpu")), "cpu": torch.backends.cpu.get_cpu_capability()}
    print(f"{scheme}: one decode step of batch {args.batch} after {args.prompt} prompt tokens, {model.layers_n} blocks "
          f"({result['environment']['device']})")
    print(f"{'form':<31}{'ops':>8}{'allocations':>13}{'host reads':>12}{'step s':>9}")
    for name, r in rows.items():
        step = "-" if r["step_s"] is None else f"{r['step_s']:.4f}"
        print(f"{name:<31}{r['ops']:>8}{r['allocations']:>13}{r['host_reads']:>12}{step:>9}")
    kern = rows.get("captured shape on the kernels")
    if kern:
        print(f"  on the kernels: {kern['torch_ops']} torch ops + {sum(kern['launches'].values())} launches "
              f"({', '.join(f'{k} {v}' for k, v in sorted(kern['launches'].items()))}); same logits: {kern['same_logits']}")
    print(f"the same logits, bit for bit: {same}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not same:
        raise SystemExit("the captured-shape step gave other logits than the eager one")
    if kern and not kern["same_logits"]:
        raise SystemExit("the captured step on the kernels gave other logits than the torch path")


if __name__ == "__main__":
    main()
