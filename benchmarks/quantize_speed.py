"""Time of a calibrated `qconvert quantize`, on the CPU or one GPU (a benchmark, not a test).

Three runs, each in a child process (so that its peak RSS is its own, read with wait4):

  cpu-c4    SmolLM2-135M, is-w4a8 (GPTQ), 128 x 512 tokens of the C4 excerpt, --device cpu
            (goal: <= 200 s on the 2-core machine)
  cpu-main  the README's first command: SmolLM2-135M, is-w4a8, --calib self (128 x 128 tokens
            the model writes itself, its default shape), --device cpu (goal: <= 300 s)
  gpu       a random-weight Llama-3-8B-shaped checkpoint (qconvert.bench.SYNTHETIC["llama3-8b"],
            bf16 safetensors written by this script on the GPU machine's disk, with a word-level
            tokenizer and a seeded random text to calibrate on), is-w4a8, GPTQ on 128 x 512
            tokens, --device cuda (targets: whole run <= 5 min, peak GPU memory <= 12 GB, peak
            RSS <= 0.35 x the checkpoint's bytes)

Reported: the whole run, the time of each stage (embeddings and head, then each decoder block:
read from the run's journal as its lines appear), the GPTQ solves and calibration forwards
(from quantize --json), peak GPU memory (torch.cuda.max_memory_allocated) and peak RSS.
``--layers N`` uses N decoder blocks instead of 32 (the per-block figures extrapolate);
``--vocab V`` a vocabulary of V tokens instead of the shape's (at least the tokenizer's 16002; the
embeddings and head shrink, a decoder block's time does not change);
``--budget-s S`` bounds the whole script (the synthetic checkpoint's writing included): the run
is stopped when S seconds are spent and reports the blocks finished by then.

    python benchmarks/quantize_speed.py cpu-c4 --data-file ../shared/data/c4-en/c4-train.00000-of-01024.first1000.jsonl
    python benchmarks/quantize_speed.py cpu-main
    python benchmarks/quantize_speed.py gpu --layers 2 --vocab 32768 --budget-s 35   # benchmarks/gpu_check.sh, part d
    python benchmarks/quantize_speed.py gpu --budget-s 540                 # the whole 8B-shaped model
"""

from __future__ import annotations

import _thread
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GOALS = {"cpu-c4": {"whole_seconds": 200.0}, "cpu-main": {"whole_seconds": 300.0},
         "gpu": {"whole_seconds": 300.0, "peak_gpu_gb": 12.0, "peak_rss_fraction": 0.35}}
CHILD_OVERHEAD_S = 8.0  # the quantize child's start (imports) and its result's writing, left out of its budget
WORDS = 16000  # the synthetic tokenizer's vocabulary: w0 .. w15999 (ids below any real vocabulary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", choices=sorted(GOALS))
    ap.add_argument("--data-file", help="cpu-c4: the C4 excerpt (.jsonl)")
    ap.add_argument("--layers", type=int, help="gpu: decoder blocks of the synthetic model (default: 32, as Llama-3-8B)")
    ap.add_argument("--vocab", type=int, help=f"gpu: vocabulary size (default: the shape's; at least {WORDS + 2})")
    ap.add_argument("--shape", default="llama3-8b", help="gpu: qconvert.bench.SYNTHETIC shape (smollm2-135m to try it on a CPU)")
    ap.add_argument("--device", help="override the run's --device (gpu run: cuda)")
    ap.add_argument("--budget-s", type=float, help="stop the run after this many seconds and report what finished")
    ap.add_argument("--nsamples", type=int, help="calibration samples (default: quantize's, 128)")
    ap.add_argument("--seqlen", type=int, help="tokens per sample (default: quantize's, 512; 128 for cpu-main)")
    ap.add_argument("--workdir", help="where the synthetic checkpoint and OUT go (default: a temporary directory)")
    ap.add_argument("--json", help="result file (default: benchmarks/results/quantize_speed_<run>.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one quantize in this process
    args = ap.parse_args()
    if args.child:
        return _child(json.loads(args.child))
    t0 = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qspeed-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = _spec(args, work)
    if args.budget_s:  # the budget bounds the whole script: what writing the checkpoint took is spent
        spec["budget_s"] = max(1.0, args.budget_s - (time.perf_counter() - t0) - CHILD_OVERHEAD_S)
    result = _run_child(spec, work)
    result.update(run=args.run, goals=GOALS[args.run], environment=_environment())
    _print(result)
    path = Path(args.json or RESULTS / f"quantize_speed_{args.run.replace('-', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def _spec(args, work: Path) -> dict:
    """What the child runs: qconvert.quantize's arguments, and the command line that says the same."""
    calib = {k: v for k, v in (("nsamples", args.nsamples), ("seqlen", args.seqlen)) if v is not None}
    if args.run == "cpu-c4":
        if not args.data_file:
            raise SystemExit("cpu-c4 needs --data-file (the C4 excerpt, .jsonl)")
        source, device = "smollm2-135m", args.device or "cpu"
        calib.update(source="c4", data_file=str(Path(args.data_file).resolve()))
        extra = f"--calib c4 --data-file {Path(args.data_file).name}"
    elif args.run == "cpu-main":
        source, device, extra = "smollm2-135m", args.device or "cpu", ""
        calib.update(source="self")
    else:
        device = args.device or "cuda"
        _check_device(device)  # before the checkpoint is written: a missing GPU costs seconds, not minutes
        if args.vocab is not None and args.vocab < WORDS + 2:
            raise SystemExit(f"--vocab {args.vocab}: the calibration tokenizer has {WORDS + 2} tokens; give at least that")
        source, ckpt_bytes = _synthetic_checkpoint(work / f"src-{args.shape}-{args.layers or 'all'}-{args.vocab or 'v'}",
                                                   args.shape, args.layers, device, args.vocab)
        calib.update(source="file", data_file=str(Path(source) / "calib.txt"))
        extra = "--calib file --data-file SRC/calib.txt"
    extra += "".join(f" --{k} {v}" for k, v in calib.items() if k in ("nsamples", "seqlen"))
    cmd = f"qconvert quantize {source if args.run != 'gpu' else 'SRC'} --scheme is-w4a8 {extra} --device {device} -o OUT"
    spec = {"source": str(source), "out": str(work / "out"), "device": device, "calib": calib,
            "budget_s": args.budget_s, "report": str(work / "report.json"), "command": " ".join(cmd.split())}
    if args.run == "gpu":
        spec.update(checkpoint_bytes=ckpt_bytes, shape=args.shape, layers=args.layers, vocab=args.vocab)
    return spec


def _check_device(device: str) -> None:
    from qconvert.errors import QConvertError
    from qconvert.placement import resolve_device

    if device != "cpu":
        try:
            resolve_device(device)
        except QConvertError as e:
            raise SystemExit(f"quantize_speed.py gpu: {e}") from None


def _run_child(spec: dict, work: Path) -> dict:
    result_file = work / "child.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "gpu", "--child", json.dumps({**spec, "result": str(result_file)})])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not result_file.is_file():
        raise SystemExit(f"the quantize run failed (exit status {code})")
    result = json.loads(result_file.read_text())
    result.update(command=spec["command"], child_wall_seconds=round(wall, 1), peak_rss_bytes=usage.ru_maxrss * 1024)
    if "checkpoint_bytes" in spec:
        result.update(checkpoint_bytes=spec["checkpoint_bytes"], shape=spec["shape"], layers=spec["layers"], vocab=spec.get("vocab"),
                      peak_rss_fraction=round(result["peak_rss_bytes"] / spec["checkpoint_bytes"], 3))
    return result


def _child(spec: dict) -> None:
    """One quantize in this process; a watcher thread times the journal's lines (one per stage)
    and, past the budget, interrupts the run."""
    import torch

    from qconvert import quantize
    from qconvert.calibration_text import CalibSettings

    partial = Path(spec["out"] + ".partial") / ".journal.jsonl"
    marks, done = [], threading.Event()
    t0 = time.perf_counter()

    def watch():
        while not done.wait(0.2):
            stages = (partial.read_text().count("\n") - 1) if partial.is_file() else 0  # line 1: the settings
            while len(marks) < stages:
                marks.append(round(time.perf_counter() - t0, 2))
            if spec["budget_s"] and time.perf_counter() - t0 > spec["budget_s"]:
                _thread.interrupt_main()
                return

    threading.Thread(target=watch, daemon=True).start()
    finished, timing = True, {}
    try:
        quantize(spec["source"], "is-w4a8", spec["out"], force=True, progress=False, device=spec["device"],
                 calib=CalibSettings(**spec["calib"]), json_report=spec["report"], announce=print)
        timing = json.loads(Path(spec["report"]).read_text())["timing"]
    except KeyboardInterrupt:
        finished = False
    whole = time.perf_counter() - t0
    done.set()
    blocks = [round(b - a, 2) for a, b in zip(marks, marks[1:])]
    result = {"finished": finished, "whole_seconds": round(whole, 1), "stages_done": len(marks),
              "setup_seconds": marks[0] if marks else None, "block_seconds": timing.get("stage_seconds") or blocks,
              "solve_seconds": timing.get("solve_seconds"), "forward_seconds": timing.get("forward_seconds"),
              "calib_text_seconds": timing.get("calib_text_seconds"), "device": spec["device"]}
    if spec["device"].startswith("cuda"):
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        result["gpu"] = torch.cuda.get_device_name()
    Path(spec["result"]).write_text(json.dumps(result) + "\n")


def _synthetic_checkpoint(directory: Path, shape: str, layers: int | None, device: str,
                          vocab: int | None = None) -> tuple[str, int]:
    """A random-weight checkpoint of ``shape`` (bf16 safetensors, shards of ~2 GB, an index), a
    word-level tokenizer and a seeded random text; made once per directory.  Returns (path, weight bytes)."""
    if not (directory / "model.safetensors.index.json").is_file():
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import quantize_speed as q; "
                f"q.write_synthetic({str(directory)!r}, {shape!r}, {layers!r}, {device!r}, {vocab!r})")
        subprocess.run([sys.executable, "-c", code], check=True)  # its memory is not the run's
    return str(directory), sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def write_synthetic(directory: str, shape: str, layers: int | None, device: str, vocab: int | None = None) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from qconvert.bench import SYNTHETIC
    from qconvert.skeleton import build_skeleton

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kw = dict(SYNTHETIC[shape], **({"num_hidden_layers": layers} if layers else {}), **({"vocab_size": vocab} if vocab else {}))
    config = LlamaConfig(**kw, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    dev = device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            save_file(shard, str(directory / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
            weight_map.update({k: f"model-{n:05d}.safetensors" for k in shard})
        shard, size = {}, 0

    for name, p in build_skeleton(config).named_parameters():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(p.shape, device=dev, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen).cpu()
        shard[name], size = t, size + t.numel() * 2
        if size >= 2 << 30:
            flush()
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    _word_tokenizer().save_pretrained(directory)
    g = torch.Generator().manual_seed(1)
    ids = torch.multinomial(1.0 / torch.arange(1, WORDS + 1, dtype=torch.float64), 400_000, replacement=True, generator=g)
    (directory / "calib.txt").write_text(" ".join(f"w{i}" for i in ids.tolist()) + "\n")


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(WORDS)}
    vocab["<unk>"], vocab["<eos>"] = WORDS, WORDS + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _environment() -> dict:
    import torch

    def sh(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None

    from qconvert.bench import _git_commit  # $COMMIT first: a tree copied to a GPU machine may carry a stale .git

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _git_commit(),
            "dirty": None if os.environ.get("COMMIT") else bool(sh("git", "status", "--porcelain", "--untracked-files=no")),
            "load_average": os.getloadavg(),
            "cpus": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def _print(r: dict) -> None:
    gb = 1e9
    rows = [("command", r["command"]), ("device", r.get("gpu") or r["device"]),
            ("whole run", f"{r['whole_seconds']:.1f} s" + ("" if r["finished"] else f" (stopped: budget; {r['stages_done']} stages done)")),
            ("setup (tokens, block-0 inputs, embeddings)", f"{r['setup_seconds']} s")]
    blocks = r["block_seconds"]
    per = list(blocks.values())[1:] if isinstance(blocks, dict) else blocks
    if per:
        rows.append(("time per block (mean, max)", f"{sum(per) / len(per):.2f} s, {max(per):.2f} s over {len(per)} blocks"))
    if r.get("calib_text_seconds") is not None:
        rows.append(("calibration text (read, or written by the model)", f"{r['calib_text_seconds']} s"))
    if r.get("solve_seconds") is not None:
        rows.append(("GPTQ solves / calibration forwards", f"{r['solve_seconds']} s / {r['forward_seconds']} s"))
    if "peak_gpu_bytes" in r:
        rows.append(("peak GPU memory (max_memory_allocated)", f"{r['peak_gpu_bytes'] / gb:.2f} GB"))
    rows.append(("peak RSS", f"{r['peak_rss_bytes'] / gb:.2f} GB"
                 + (f" ({r['peak_rss_fraction']} x the {r['checkpoint_bytes'] / gb:.1f} GB checkpoint)" if "peak_rss_fraction" in r else "")))
    rows.append(("load average at the end", " ".join(f"{x:.1f}" for x in r["environment"]["load_average"])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
