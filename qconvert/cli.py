"""The ``qconvert`` command line: thin wrappers over the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from qconvert import __version__
from qconvert.errors import QConvertError


class _Group(click.Group):
    """Turns ``QConvertError`` into a one-line message (traceback with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QConvertError as e:
            if (ctx.obj or {}).get("debug") or os.environ.get("QCONVERT_DEBUG"):
                raise
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo(_interrupted_message(), err=True)
            sys.exit(130)


def _interrupted_message() -> str:
    """What Ctrl-C leaves: the partial directory quantize opened, if it still exists, to resume from."""
    pipeline = sys.modules.get("qconvert.pipeline")  # not imported: no conversion ran
    opened = [p for p in getattr(pipeline, "OPENED_PARTIALS", []) if p.is_dir()]
    if opened:
        return (f"interrupted; the finished blocks are kept in {opened[-1]}: repeat the command with --resume "
                "to continue from them")
    return "interrupted"


def _console():
    from rich.console import Console

    console = Console()
    # piped or captured output gets wide rows instead of truncated names
    return console if console.is_terminal else Console(width=200)


def _serving_table(findings, title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("layer", "vLLM scheme", "kernel", "", "note"):
        t.add_column(col)
    marks = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]", "error": "[red]error[/red]"}
    for f in findings:
        t.add_row(f.layer, f.scheme, f.kernel, marks[f.level], f.note)
    return t


_target_option = click.option("--target", metavar="vllm[:cpu|:sm80|:sm89|:sm90]",
                              help="Check, layer by layer, that this engine would serve the export (docs/export.md).")
_tp_option = click.option("--tensor-parallel", "tensor_parallel", default=1, show_default=True, type=click.IntRange(min=1),
                          help="With --target: the tensor-parallel size to check (vllm serve --tensor-parallel-size); "
                               "an export's groups are sized to divide each rank's K.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qconvert")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, debug):
    """Quantize a Hugging Face causal LM, check it, measure it.

    \b
    qconvert quantize smollm2-135m --scheme is-w4a8 -o out/
    qconvert generate out/ --prompt "The capital of France is"
    qconvert eval out/ --data-file wiki.test.raw --seqlen 512 --max-windows 40
    qconvert inspect out/
    """
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("source")
@click.option("--scheme", "-s", default="is-w4a8", show_default=True, help="Preset name (see `qconvert schemes`) or a .toml path.")
@click.option("--output", "-o", "out", required=True, type=click.Path(path_type=Path), help="Output directory (must not exist unless --force).")
@click.option("--group-size", "-g", type=int, help="Weight group size along the input dimension (overrides the scheme).")
@click.option("--quantize-lm-head", is_flag=True, help="Quantize lm_head too (kept in full precision by default).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Keep linear modules matching this fnmatch pattern in full precision (repeatable).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard.")
@click.option("--revision", help="Hub revision (branch, tag or commit) of a Hub id SOURCE.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a Hub model's own Python code to run (off by default).")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt pickle weights (torch.load(weights_only=True)); off by default.")
@click.option("--force", is_flag=True, help="Overwrite OUT (and any OUT.partial) if it exists.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT.partial.")
@click.option("--base", type=click.Choice(["rtn", "gptq"]), help="Weight solver, overriding the scheme's.")
@click.option("--calib", type=click.Choice(["wikitext2", "c4", "file", "self"]),
              help="Calibration text for GPTQ: a dataset (local with --data-file, else from the Hub), a file, or "
                   "text the model writes itself. Default: file if --data-file is given, else self.")
@click.option("--data-file", type=click.Path(path_type=Path), help="Calibration text: a UTF-8 text file (.txt, wiki.train.raw, ...), or .jsonl with a 'text' field.")
@click.option("--nsamples", type=click.IntRange(min=1),
              help="Calibration samples [default: 128].")
@click.option("--seqlen", type=click.IntRange(min=2),
              help="Tokens per calibration sample [default: 512, 128 for --calib self; at most the model's context].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration sampling.")
@click.option("--max-memory", help="RAM for calibration activations (e.g. 8GB); above it they are kept on disk. "
                                   "Default: half the available memory.")
@click.option("--calib-dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="Precision of the calibration forward's matmuls; bfloat16 is faster on CPUs with bf16 units.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]),
              help="Where calibration runs: one GPU (blocks onloaded one at a time) or the CPU. "
                   "Default: cuda when torch can use a GPU, else cpu.")
@click.option("--max-gpu-memory", help="GPU memory for calibration activations (e.g. 12GB); beyond it they go to pinned "
                                       "CPU memory, then to disk. Default: half the free GPU memory.")
@click.option("--asym-calib", "asym", type=click.FloatRange(0.0, 1.0), metavar="ALPHA",
              help="Asymmetric calibration (GPTAQ): GPTQ aims each layer at the float model's output, not at its own "
                   "from the quantized inputs; ALPHA scales the correction (0: off). Runs the float blocks too. "
                   "Default: the scheme's (0.25 for is-w4a8, w4a8-fs, w4a16-gptq-zp and quik-w4a4; 0 for the others).")
@click.option("--rotate", type=click.Choice(["none", "hadamard", "random", "hadamard+online"]),
              help="Rotate the residual stream before quantizing (QuaRot-style, folded into the weights: no run-time "
                   "cost; fewer outliers, lower error at 4 bits). hadamard+online also rotates down_proj's input at "
                   "run time (a fast Hadamard transform per token; for 4-bit activations). Default: the scheme's "
                   "(hadamard for is-w4a8, w4a8-fs, w4a16-gptq, w4a16-gptq-zp and w8a8, hadamard+online for the illm-* "
                   "schemes, none for the others).")
@click.option("--rotate-seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the rotation's random signs (hadamard) or matrices (random).")
@click.option("--float-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
              help="The dtype of OUT's unquantized tensors (embedding, norms, biases, a float lm_head). auto: the "
                   "source's own (float16 for a quantized or F16 .gguf, which transformers reads as float32).")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Also write the per-layer report (error, α, headroom, time) to this file.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Override one of the method's parameters (repeatable; `qconvert schemes` and docs/schemes.md list "
                   "them), e.g. --param clip_min=0.8; the value is read as TOML, else as a string.")
@click.option("--lorc-rank", type=int, help="zeroquant-fp schemes: rank of the low-rank error compensation (0: none); "
                                            "the same as --param lorc_rank=R.")
@click.option("--fsbr/--no-fsbr", default=None, help="i-llm schemes: smooth every activation -> weight pair (on in the "
                                                     "presets) or not; the same as --param fsbr=true|false.")
@click.option("--outliers", type=int, help="quik schemes: input channels per linear kept in fp16 (0: none) instead of "
                                           "'auto' (K/16, at most 256); the same as --param outliers=N.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def quantize(source, scheme, out, group_size, quantize_lm_head, exclude, max_shard_size, revision, trust_remote_code,
             allow_pickle, force, resume, base, calib, data_file, nsamples, seqlen, seed, max_memory, calib_dtype, device,
             max_gpu_memory, asym, rotate, rotate_seed, float_dtype, json_path, params, lorc_rank, fsbr, outliers, quiet):
    """Quantize SOURCE into OUT, one decoder block at a time.

    SOURCE is a local HF directory, a .gguf file, a Hub id (org/name) or the
    built-in alias smollm2-135m.

    \b
    Every preset but is-w4a8-rtn and zqfp-w8a8 calibrates (GPTQ, and QUIK's outlier
    choice and I-LLM's smoothing) block by block on --nsamples x --seqlen tokens
    (128 x 512 of data; 128 x 128 of text the model writes itself when no data is
    given); those two need no data, nor does --base rtn but for QUIK and I-LLM,
    whose outliers and smoothing come from the calibration activations.

    \b
    qconvert quantize smollm2-135m --scheme is-w4a8 -o out/
    qconvert quantize smollm2-135m --calib c4 --data-file c4.jsonl -o out/
    qconvert quantize ./Llama-3-8B --scheme w4a8-fs -g 64 -o llama-fs/
    qconvert quantize ./Llama-3-8B --device cuda --max-gpu-memory 12GB -o llama-is/
    qconvert quantize smollm2-135m --scheme is-w4a8 --rotate hadamard -o out-rot/
    """
    from qconvert.calibration_text import CalibSettings
    from qconvert.pipeline import quantize as run
    from qconvert.schemes_registry import load_scheme, parse_param, with_params

    settings = CalibSettings(calib, str(data_file) if data_file else None, nsamples, seqlen, seed, max_memory, calib_dtype,
                             max_gpu_memory, asym)
    overrides, options = dict(parse_param(p) for p in params), {}
    for key, value, option in (("lorc_rank", lorc_rank, "--lorc-rank"), ("fsbr", fsbr, "--fsbr / --no-fsbr"),
                               ("outliers", outliers, "--outliers")):
        if value is not None:
            overrides[key], options[key] = value, option
    if overrides:
        scheme = with_params(load_scheme(scheme), overrides, options)
    path = run(source, scheme, out, group_size=group_size, quantize_lm_head=quantize_lm_head, exclude=exclude,
               force=force, resume=resume, max_shard_size=max_shard_size, revision=revision, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
               progress=not quiet, base=base, calib=settings, json_report=json_path, device=device, announce=click.echo,
               rotate=rotate, rotate_seed=rotate_seed, float_dtype=float_dtype)
    report = json.loads((path / "qconvert.json").read_text())["totals"]
    ratio = report["quantized_fp16_bytes"] / max(report["quantized_bytes"], 1)
    on_disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    click.echo(
        f"wrote {path}: {report['quantized_layers']} quantized linears, "
        f"{report['quantized_bytes'] / 1e6:.1f} MB for them ({ratio:.2f}x smaller than fp16)"
        + (f", least int32 headroom {report['min_headroom_bits']} bits" if report["min_headroom_bits"] is not None else "")
        + f"; {on_disk / 1e6:.1f} MB on disk in all (embeddings, norms and layers kept in float included)"
    )


@cli.command("eval")
@click.argument("target")
@click.option("--dataset", default="wikitext2", show_default=True, type=click.Choice(["wikitext2"]))
@click.option("--data-file", type=click.Path(path_type=Path), help="Local raw text (e.g. wiki.test.raw) instead of a download.")
@click.option("--seqlen", default=2048, show_default=True, type=click.IntRange(min=2), help="Tokens per window.")
@click.option("--max-windows", type=click.IntRange(min=1), help="Evaluate only the first N windows.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--tasks", help="Run these lm-evaluation-harness tasks (comma-separated) instead of perplexity; "
                              'needs pip install "qconvert[lmeval]".')
@click.option("--limit", type=click.FloatRange(min=0, min_open=True), help="lm-eval: examples per task (a fraction if < 1).")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="lm-eval: few-shot examples [default: each task's own].")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False, path_type=Path), help="lm-eval: a directory of your own task YAML files.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="lm-eval: requests per forward (and per generate call) [default: 1].")
@click.option("--device", help="cuda or cpu [default: cuda if usable (float16, the OUT's kernels), else cpu (float32, the exact reference)].")
def eval_cmd(target, dataset, data_file, seqlen, max_windows, as_json, quiet, tasks, limit, num_fewshot, include_path,
             batch_size, device):
    """Perplexity of TARGET (an OUT, a compressed-tensors export of one, or any SOURCE) on
    non-overlapping windows.  For an OUT or an export the result is also kept in its
    eval.json (an export runs in transformers, as its users run it).  With --tasks,
    lm-eval's tasks instead, on the same model (docs/export.md).  On a GPU where one is
    usable (float16, the OUT's kernels), else on the CPU (float32, the exact reference):
    --device decides, and each score says where it ran.

    \b
    qconvert eval out/ --data-file wiki.test.raw --seqlen 512 --max-windows 40
    qconvert eval smollm2-135m --data-file wiki.test.raw --seqlen 512 --max-windows 40
    qconvert eval out/ --tasks hellaswag,arc_easy --limit 200 --batch-size 16
    """
    from qconvert.bench import resolve_device

    resolve_device(device, "qconvert eval TARGET")  # a device that cannot be, before any work
    if batch_size is not None and not tasks:
        raise QConvertError("--batch-size is lm-eval's, with --tasks; perplexity scores one window at a time")
    note = lambda line: click.echo(f"Note: {line}.", err=True)  # noqa: E731
    if tasks:
        from qconvert.lmeval import run_tasks

        limit = int(limit) if limit is not None and limit >= 1 else limit
        res = run_tasks(target, tasks.split(","), limit=limit, num_fewshot=num_fewshot, include_path=include_path,
                        batch_size=batch_size or 1, device=device, note=note)
        if as_json:
            click.echo(json.dumps(res.to_dict(), indent=2, default=str))
        for task in ([] if as_json else res.tasks):
            shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" + (f" ± {e:.4f}" if e is not None else "")
                              for k, (v, e) in res.metrics(task).items())
            click.echo(f"{target}: {task}: {shown} ({res.n_shot.get(task, 0)}-shot; {res.runtime['device']}, "
                       f"{res.runtime['dtype']})")
        return
    from qconvert.calibration_text import load_eval_text
    from qconvert.evaluate import load_where_asked, perplexity, runtime_label, save_result
    from qconvert.source import transformers_bars

    text = load_eval_text(dataset, data_file)
    # a local file is named by itself (and its text's hash): any file can be given, not only WikiText-2's
    label = dataset if data_file is None else Path(data_file).name
    with transformers_bars(not quiet):
        model, tok, kind, _, dtype = load_where_asked(target, device, "qconvert eval TARGET", note)
    res = perplexity(model, tok, text, seqlen=seqlen, max_windows=max_windows, progress=not quiet)
    record = {"target": str(target), "kind": kind, "dataset": label, **res.to_dict(), **runtime_label(model, dtype)}
    if data_file is not None:
        import hashlib

        record["text_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    if kind in ("qconvert", "compressed-tensors"):  # kept for the model card (qconvert push)
        save_result(Path(target), record)
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(f"{target}: perplexity {res.perplexity:.3f} on {label} ({res.windows} windows x {res.seqlen} tokens; "
                   f"{record['device']}, {record['dtype']})")


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer report as JSON.")
def inspect(out, as_json):
    """Per-layer table of a quantized OUT: bits, group size, α, int32 headroom, bytes."""
    from rich.table import Table

    from qconvert.formats.native import read_quant_config

    read_quant_config(out)
    if not (out / "qconvert.json").is_file():
        raise QConvertError(f"{out} has no qconvert.json report; the output is incomplete: re-run qconvert quantize")
    report = json.loads((out / "qconvert.json").read_text())
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from qconvert.layouts import get_layout

    t = Table(title=f"{out} — scheme {report['scheme']['name']} from {report['source']}")
    for col in ("layer", "layout", "N x K", "bits", "group", "α", "headroom (bits)", "extra", "bytes", "fp16 bytes"):
        t.add_column(col, justify="left" if col in ("layer", "layout") else "right")
    for r in report["layers"]:
        fig = get_layout(r["layout"], where=r["name"]).figures(r)  # what the layout declares worth showing
        t.add_row(r["name"], r["layout"], "x".join(map(str, r["shape"])), str(r["bits"]), str(r.get("group_size") or "channel"),
                  fig.get("α", "-"), fig.get("headroom", "-"), fig.get("extra", "-"), f"{r['bytes']:,}", f"{r['fp16_bytes']:,}")
    tot = report["totals"]
    t.add_section()
    t.add_row("total", "", "", "", "", "", str(tot["min_headroom_bits"] if tot["min_headroom_bits"] is not None else "-"), "",
              f"{tot['quantized_bytes']:,}", f"{tot['quantized_fp16_bytes']:,}")
    _console().print(t)
    rot = report.get("rotation")
    if rot:
        online = rot.get("online")
        click.echo(f"rotated before quantization: {rot.get('mode')}, seed {rot.get('seed')}"
                   + (f"; down_proj's input rotated at run time (Hadamard {online['order']} = {online['m']} x "
                      f"{online['p']}, {len(online.get('modules') or [])} layers)" if online else ""))
    if report.get("rotation_skipped"):
        click.echo(report["rotation_skipped"])
    mm = report.get("multimodal")
    if isinstance(mm, dict):
        rotated = mm.get("rotated") or []
        click.echo(f"{mm.get('model_type')} image-text checkpoint: its image encoder and projector ({mm.get('tensors')} "
                   "tensors) kept as they came, in multimodal/"
                   + (f" ({', '.join(rotated)} rotated with the residual stream)" if rotated else "")
                   + "; qconvert export writes the whole model again")
    cal = report.get("calibration")
    if cal:
        click.echo(f"calibrated on {cal.get('source')} ({cal.get('nsamples')} x {cal.get('seqlen')} tokens, seed "
                   f"{cal.get('seed')}" + (f", --asym-calib {cal['asym']:g}" if cal.get("asym") else "") + ")"
                   + (f"; float path: {report['float_path']}" if report.get("float_path") else ""))


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--against", metavar="SOURCE", help="Compare with this source (default: the one OUT was made from).")
@click.option("--data-file", type=click.Path(path_type=Path), help="Sample text (default: text the source model writes; a built-in passage when streamed).")
@click.option("--tokens", default=128, show_default=True, type=click.IntRange(min=2), help="Sample length in tokens.")
@click.option("--min-snr", default=5.0, show_default=True, help="Fail when a layer's output SNR (dB) is below this.")
@click.option("--min-top1", default=0.3, show_default=True, help="Fail when next-token top-1 agreement is below this.")
@click.option("--no-compare", is_flag=True, help="Check files and tensors only; do not run the models.")
@click.option("--stream/--no-stream", default=None,
              help="Run the source one decoder block at a time [default: when it needs over half the available RAM].")
@_target_option
@_tp_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(out, against, data_file, tokens, min_snr, min_top1, no_compare, stream, target, tensor_parallel, as_json):
    """Check OUT: sha256 of every file, tensor dtypes and shapes, the int32 bound, and
    (unless --no-compare) per-layer SNR, KL and top-1 agreement against the source.
    Exits 1 on any failure; a passing report is saved as OUT/verify.json.

    \b
    qconvert verify out/
    qconvert verify out/ --against ./Llama-3-8B --data-file sample.txt --json
    qconvert verify out/ --stream     # a source larger than RAM: one float32 block at a time
    """
    from qconvert.verify import verify as run

    rep = run(out, against, data_file, tokens, compare_source=not no_compare, min_snr_db=min_snr, min_top1=min_top1,
              target=target, tensor_parallel=tensor_parallel, stream=stream,
              announce=None if as_json else (lambda line: click.echo(f"verify: {line}", err=True)))
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
    else:
        click.echo(f"{out}: {rep.checked_files} files and {rep.checked_tensors} tensors checked")
        if rep.against:
            click.echo(f"against {rep.against} on {rep.sample_tokens} tokens ({rep.sample}"
                       f"{'; streamed block by block' if rep.streamed else ''}): min layer SNR {rep.min_snr_db} dB, "
                       f"KL {rep.kl:.4f}, top-1 agreement {rep.top1_agreement:.3f}")
        if rep.serving:
            from qconvert.serving import Finding

            _console().print(_serving_table([Finding(**f) for f in rep.serving], f"{target}, tensor parallel {tensor_parallel}"))
        for f in rep.failures:
            click.echo(f"FAIL {f}", err=True)
        click.echo("OK" if rep.ok else f"FAILED ({len(rep.failures)} problems)")
        if rep.removed_stale:
            click.echo(f"removed {Path(out) / 'verify.json'}: the passing report of an earlier run no longer holds", err=True)
        if rep.kept_earlier:
            click.echo(f"kept {Path(out) / 'verify.json'}: OUT's own checks passed; {rep.kept_earlier}", err=True)
        if rep.kept_comparison:
            click.echo(f"{Path(out) / 'verify.json'} keeps the earlier run's comparison with {rep.kept_comparison} "
                       "(this run compared nothing; the files are the ones it compared)", err=True)
    if not rep.ok:
        sys.exit(1)


def _cpu_load() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busy_cpu_note(*loads) -> str | None:
    """What to say about CPU timings taken while other work ran: a load average above the core
    count (at the start or the end of the run) can make them several times off, either way."""
    cpus = os.cpu_count() or 1
    worst = max((v for v in loads if v is not None), default=None)
    if worst is None or worst <= cpus:
        return None
    return (f"the machine was busy during this run (load average {worst:.1f} on {cpus} cores): these CPU timings "
            f"can be several times off, either way; repeat on an idle machine")


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        vals = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers (e.g. 1,16,64)") from None
    if not vals or min(vals) < 1:
        raise click.BadParameter(f"{value!r}: give positive integers")
    return vals


@cli.command()
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--kernels", is_flag=True, help="Time the W4A8 kernels against cuBLAS FP16 (needs a GPU).")
@click.option("--synthetic", metavar="MODEL", help="End to end on a random-weight model of this shape: llama3-8b, smollm2-135m.")
@click.option("--layers", type=click.IntRange(min=1), help="With --synthetic: fewer decoder layers than the real model.")
@click.option("--device", help="cuda or cpu [default: cuda if usable, else cpu (the reference path, labelled so)].")
@click.option("--against", metavar="SOURCE", help="With OUT: the float original (default: the source OUT was made from).")
@click.option("--shapes", default="llama3-8b", show_default=True, help="With --kernels: llama3-8b, smollm2-135m or all.")
@click.option("--m", "ms", default="1,16,64,256,1024,4096", show_default=True, callback=_int_list, help="With --kernels: token counts M.")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(min=50), help="With --kernels: timed samples (median).")
@click.option("--scheme", default="is-w4a8", show_default=True,
              help="With --kernels: the kernel family (is-w4a8, zqfp-w4a8, quik-w4a4, illm-w8a8); with --synthetic: the "
                   "random-weight twin (is-w4a8, quik-w4a4, illm-w8a8: I-LLM's integer-only model).")
@click.option("--prefill", default=2048, show_default=True, type=click.IntRange(min=1), help="Prefill length (batch 1).")
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(min=1), help="Greedy decode steps.")
@click.option("--batch", "batches", default="1,16,64", show_default=True, callback=_int_list, help="Decode batch sizes.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="End-to-end repeats (median).")
@click.option("--budget-s", type=click.FloatRange(min=1), help="End to end: bound the whole run's seconds (fewer repeats "
                                                                "and tokens when short; what is left out is said).")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="End to end on CUDA: run q/k/v and gate/up as one W4A8 GEMM each (same outputs), or one per linear.")
@click.option("--norm-kernels/--no-norm-kernels", default=True, show_default=True,
              help="End to end on CUDA: run both models' RMSNorms on the norm kernel, or as transformers' eight ops.")
@click.option("--rope-kernels/--no-rope-kernels", default=True, show_default=True,
              help="End to end on CUDA: run both models' RoPE on the rope kernel (same outputs), or as transformers' "
                   "ten ops a block.")
@click.option("--swiglu-kernels/--no-swiglu-kernels", default=True, show_default=True,
              help="End to end on CUDA: run both models' MLP activation silu(gate) * up on the swiglu kernel (torch's "
                   "steps and roundings), or as transformers' two ops a block.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the result as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="PNG: speed-up against M (--kernels), or "
                                                                           "tokens/s per measure (end to end).")
def bench(out, kernels, synthetic, layers, device, against, shapes, ms, runs, scheme, prefill, new_tokens, batches,
          repeats, budget_s, fuse, norm_kernels, rope_kernels, swiglu_kernels, json_path, plot_path):
    """Speed: the kernels against cuBLAS (--kernels), or a model end to end against its
    float original (OUT, or --synthetic). An OUT's result is also kept in OUT/bench.json.

    \b
    qconvert bench --kernels --json k.json --plot k.png
    qconvert bench --synthetic llama3-8b
    qconvert bench out/
    """
    from qconvert import bench as b

    chosen = [x for x, on in (("OUT", out is not None), ("--kernels", kernels), ("--synthetic", synthetic)) if on]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of OUT, --kernels or --synthetic MODEL"
                               + (f" (got {' and '.join(chosen)})" if chosen else ""))
    if layers is not None and not synthetic:
        raise click.UsageError("--layers goes with --synthetic")
    console = _console()
    if kernels:
        if device not in (None, "cuda") and not str(device).startswith("cuda"):
            raise QConvertError(f"--device {device}: bench --kernels times the CUDA kernels, on cuda only; "
                                "`qconvert bench OUT --device cpu` times the CPU reference path")
        res = b.kernel_bench(shapes, ms, runs, scheme=scheme, progress=lambda msg: console.log(msg))
        res["summary"] = b.kernel_summary(res["results"], scheme)
        console.print(b.kernel_table(res))
        console.print(f"summary (Llama-3-8B shapes, worst case): {json.dumps(res['summary'])}")
        if plot_path is not None:
            click.echo(f"plot: {b.plot_kernels(res, plot_path)}")
    else:
        kw = dict(device=device, prefill=prefill, new_tokens=new_tokens, batches=batches, repeats=repeats, budget_s=budget_s,
                  fuse=fuse, norm_kernels=norm_kernels, rope_kernels=rope_kernels, swiglu_kernels=swiglu_kernels)
        load_before = _cpu_load()
        if synthetic:
            res = b.synthetic_bench(synthetic, layers=layers, scheme=scheme, **kw)
        else:
            res = b.out_bench(out, against=against, **kw)
        if res["runtime"] == "cpu-reference":
            console.print("[yellow]No GPU: the quantized model runs the exact CPU reference, written for exactness, "
                          "not speed; these figures say nothing about the kernels.[/yellow]")
        on_cpu = str((res.get("environment") or {}).get("device", "")).startswith("CPU")
        busy = _busy_cpu_note(load_before, _cpu_load()) if on_cpu else None
        if busy:
            console.print(f"[yellow]Note: {busy}.[/yellow]")
            res["note"] = f"{res['note']}; {busy}" if res.get("note") else busy
        console.print(b.model_table(res))
        if plot_path is not None:
            click.echo(f"plot: {b.plot_model(res, plot_path)}")
        if out is not None:
            b.save_result(out, res)
    if json_path is not None:
        click.echo(f"wrote {b.save_json(res, json_path)}")


@cli.command()
@click.argument("target")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Text to continue (repeatable: one batch, left-padded).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1), help="Tokens to generate per prompt.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0: greedy; above: sampled.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sampling.")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template (one user turn).")
@click.option("--device", help="cuda or cpu [default: cuda if usable, else cpu (the exact reference)].")
def generate(target, prompts, max_new_tokens, temperature, seed, chat, device):
    """Continue PROMPT with TARGET (an OUT, a compressed-tensors export of one, or any SOURCE) on
    the decode engine: the text streams as it is produced, then prefill and decode tokens/s.  An
    I-LLM OUT runs its integer-only model (on a GPU with the I-LLM kernels).

    \b
    qconvert generate out/ --prompt "The capital of France is" --max-new-tokens 32
    qconvert generate out/ --chat --prompt "Write a haiku about integers." --temperature 0.7
    qconvert generate smollm2-135m --prompt "Once upon a time"
    """
    from qconvert.evaluate import load_where_asked
    from qconvert.generate import generate as run

    load_before = _cpu_load()
    # an I-LLM OUT: its integer-only model (the runtime eval scores), on a GPU with its kernels
    model, tok, kind, dev, _ = load_where_asked(target, device, "qconvert generate TARGET --prompt TEXT",
                                                lambda line: click.echo(f"Note: {line}.", err=True))
    if hasattr(model, "decode_engine"):
        kind += " integer-only"
    single = len(prompts) == 1

    def stream(row, text):
        if single:
            click.echo(text, nl=False)

    res = run(model, tok, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
              stream_callback=stream, chat=chat)
    if single:
        click.echo()
    else:
        for prompt, text in zip(prompts, res.text):
            click.echo(f"--- {prompt}\n{text}")
    click.echo(f"[{kind} on {res.device}{', CUDA graphs' if res.graphs else ''}] prefill {res.prefill_tokens_per_s:,.1f} "
               f"tokens/s, decode {res.decode_tokens_per_s:,.1f} tokens/s ({res.decode_steps} steps)", err=True)
    busy = _busy_cpu_note(load_before, _cpu_load()) if dev.type == "cpu" else None
    if busy:
        click.echo(f"Note: {busy}.", err=True)


@cli.command()
def schemes():
    """List the scheme presets."""
    from rich.table import Table

    from qconvert.schemes_registry import list_presets

    t = Table(title="qconvert schemes")
    t.add_column("scheme")
    t.add_column("method")
    t.add_column("description")
    t.add_column("defaults")
    for s in list_presets():
        defaults = [f"--rotate {s.rotate}"] * (s.rotate != "none") + [f"--asym-calib {s.asym_calib:g}"] * bool(s.asym_calib)
        t.add_row(s.name, s.method, s.description, ", ".join(defaults) or "-")
    _console().print(t)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", metavar="BRANCH", help="Push to this branch, created from main when missing [default: main].")
@click.option("--dry-run", is_flag=True, help="Print the files and the model card; touch no network.")
@click.option("--token", help="Hub token with write access [default: HF_TOKEN, or the `hf auth login` cache].")
@click.option("--card", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Upload this file as README.md instead of the generated card (edit the --dry-run output).")
def push(out, repo_id, private, revision, dry_run, token, card):
    """Upload OUT to the Hub repo REPO_ID in one commit, with a generated model card
    (scheme, sizes, and the eval, verify and bench results saved in OUT).  OUT may
    also be a compressed-tensors export of one (qconvert export), for transformers
    and vLLM users; its card says how to load and serve it.

    \b
    qconvert push out/ me/SmolLM2-135M-is-w4a8 --dry-run
    qconvert push out/ me/SmolLM2-135M-is-w4a8 --private
    qconvert push out/ my-org/model --revision is-w4a8
    qconvert push out-ct/ me/SmolLM2-135M-is-w4a8-ct
    """
    from qconvert.hub import push as run

    text = card.read_text(encoding="utf-8") if card is not None else None
    res = run(out, repo_id, private=private, revision=revision, token=token, dry_run=dry_run, card=text)
    for warning in res.warnings or []:
        click.echo(f"warning: {warning}", err=True)
    where = f"{res.repo_id}" + (f" (branch {res.revision})" if res.revision else "")
    click.echo(("would upload" if dry_run else "uploaded") + f" {len(res.files)} files to {where}:")
    for f in res.files:
        click.echo(f"  {f.size:>14,}  {f.path_in_repo}" + (f"  ({f.note})" if f.note else ""))
    click.echo(f"  {sum(f.size for f in res.files):>14,}  bytes in all")
    if dry_run:
        click.echo("\n----- README.md -----")
        click.echo(text if text is not None else res.card)
        click.echo("(dry run: nothing was sent)")
    else:
        if res.branch_created:
            click.echo(f"created branch {res.revision}")
        click.echo(f"commit: {res.commit_url}" if res.commit_url else "done")


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="compressed-tensors", show_default=True, type=click.Choice(["compressed-tensors"]),
              help="Target format (docs/export.md).")
@click.option("--output", "-o", "dest", required=True, type=click.Path(path_type=Path), help="Directory to write (must not exist unless --force).")
@click.option("--scale-dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="dtype of weight_scale; auto = the model's dtype, which compressed-tensors expects.")
@_target_option
@_tp_option
@click.option("--force", is_flag=True, help="Overwrite the output if it is an earlier export (or empty).")
def export(out, fmt, dest, scale_dtype, target, tensor_parallel, force):
    """Write the quantized OUT in another format, loadable by transformers and vLLM.

    \b
    compressed-tensors: w4a8-is / w4a8-fs as W4A8, w4a16 as W4A16 and w4a16-zp as W4A16_ASYM
    (pack-quantized; where the group size does not divide a K, smaller groups with the same
    scales), w8a8 as W8A8 (int-quantized), fp8-fp8 without LoRC as FP8 (float-quantized).
    --target vllm:sm90 --tensor-parallel 2 first checks, layer by layer, that vLLM would serve
    it, and refuses what it would refuse.

    \b
    qconvert quantize smollm2-135m --scheme w8a8 -o out/
    qconvert export out/ --format compressed-tensors -o out-ct/ --target vllm:sm90
    vllm serve out-ct/ --tensor-parallel-size 1
    """
    from qconvert.formats.compressed_tensors import export as run

    rep = run(out, dest, force=force, scale_dtype=scale_dtype, target=target, tensor_parallel=tensor_parallel)
    if rep.serving:
        _console().print(_serving_table(rep.serving, f"{target}, tensor parallel {tensor_parallel}"))
    click.echo(f"wrote {rep.out}: {fmt} {rep.preset}, "
               + (f"group size {rep.group_size}, " if rep.group_size else "")
               + (f"each group of {rep.split_from} written as {rep.split_from // rep.group_size} of "
                  f"{rep.group_size} with its scale (the same weights; {fmt} has no padded group), "
                  if rep.split_from else "")
               + f"{rep.layers} quantized linears, {len(rep.ignored)} kept in full precision; weight_scale in "
               f"{rep.scale_dtype} (largest relative rounding {rep.max_scale_rel_error:.1e})")


def main():
    cli(prog_name="qconvert")


if __name__ == "__main__":
    main()
