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
            click.echo("interrupted; a conversion keeps its finished blocks in OUT.partial: "
                       "repeat the command with --resume to continue", err=True)
            sys.exit(130)


def _console():
    from rich.console import Console

    console = Console()
    # piped or captured output gets wide rows instead of truncated names
    return console if console.is_terminal else Console(width=200)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qconvert")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, debug):
    """Quantize a Hugging Face causal LM, check it, measure it.

    \b
    qconvert quantize smollm2-135m --scheme is-w4a8 -o out/
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
@click.option("--data-file", type=click.Path(path_type=Path), help="Calibration text: .txt, or .jsonl with a 'text' field.")
@click.option("--nsamples", default=128, show_default=True, type=click.IntRange(min=1), help="Calibration samples.")
@click.option("--seqlen", type=click.IntRange(min=2), help="Tokens per calibration sample [default: 512, or the model's context if shorter].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration sampling.")
@click.option("--max-memory", help="RAM for calibration activations (e.g. 8GB); above it they are kept on disk. "
                                   "Default: half the available memory.")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Also write the per-layer report (error, α, headroom, time) to this file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def quantize(source, scheme, out, group_size, quantize_lm_head, exclude, max_shard_size, revision, trust_remote_code,
             allow_pickle, force, resume, base, calib, data_file, nsamples, seqlen, seed, max_memory, json_path, quiet):
    """Quantize SOURCE into OUT, one decoder block at a time.

    SOURCE is a local HF directory, a .gguf file, a Hub id (org/name) or the
    built-in alias smollm2-135m.

    \b
    GPTQ-based schemes (is-w4a8, w4a8-fs, w4a16-gptq) calibrate block by block on
    --nsamples x --seqlen tokens; is-w4a8-rtn and --base rtn need no data.

    \b
    qconvert quantize smollm2-135m --scheme is-w4a8 -o out/
    qconvert quantize smollm2-135m --calib c4 --data-file c4.jsonl -o out/
    qconvert quantize ./Llama-3-8B --scheme w4a8-fs -g 64 -o llama-fs/
    """
    from qconvert.calib import CalibSettings
    from qconvert.pipeline import quantize as run

    settings = CalibSettings(calib, str(data_file) if data_file else None, nsamples, seqlen, seed, max_memory)
    path = run(source, scheme, out, group_size=group_size, quantize_lm_head=quantize_lm_head, exclude=exclude,
               force=force, resume=resume, max_shard_size=max_shard_size, revision=revision, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
               progress=not quiet, base=base, calib=settings, json_report=json_path)
    report = json.loads((path / "qconvert.json").read_text())["totals"]
    ratio = report["quantized_fp16_bytes"] / max(report["quantized_bytes"], 1)
    click.echo(
        f"wrote {path}: {report['quantized_layers']} quantized linears, "
        f"{report['quantized_bytes'] / 1e6:.1f} MB ({ratio:.2f}x smaller than fp16)"
        + (f", least int32 headroom {report['min_headroom_bits']} bits" if report["min_headroom_bits"] is not None else "")
    )


@cli.command("eval")
@click.argument("target")
@click.option("--dataset", default="wikitext2", show_default=True, type=click.Choice(["wikitext2"]))
@click.option("--data-file", type=click.Path(path_type=Path), help="Local raw text (e.g. wiki.test.raw) instead of a download.")
@click.option("--seqlen", default=2048, show_default=True, type=click.IntRange(min=2), help="Tokens per window.")
@click.option("--max-windows", type=click.IntRange(min=1), help="Evaluate only the first N windows.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def eval_cmd(target, dataset, data_file, seqlen, max_windows, as_json, quiet):
    """Perplexity of TARGET (an OUT or any SOURCE) on non-overlapping windows.
    For an OUT the result is also kept in OUT/eval.json.

    \b
    qconvert eval out/ --data-file wiki.test.raw --seqlen 512 --max-windows 40
    qconvert eval smollm2-135m --data-file wiki.test.raw --seqlen 512 --max-windows 40
    """
    from qconvert.calib import load_eval_text
    from qconvert.evaluate import load_model_and_tokenizer, perplexity, save_result

    text = load_eval_text(dataset, data_file)
    model, tok, kind = load_model_and_tokenizer(target)
    res = perplexity(model, tok, text, seqlen=seqlen, max_windows=max_windows, progress=not quiet)
    record = {"target": str(target), "kind": kind, "dataset": dataset, **res.to_dict()}
    if kind == "qconvert":
        save_result(Path(target), record)
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(f"{target}: perplexity {res.perplexity:.3f} on {dataset} ({res.windows} windows x {res.seqlen} tokens)")


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
    t = Table(title=f"{out} — scheme {report['scheme']['name']} from {report['source']}")
    for col in ("layer", "layout", "N x K", "bits", "group", "α", "headroom (bits)", "bytes", "fp16 bytes"):
        t.add_column(col, justify="left" if col in ("layer", "layout") else "right")
    for r in report["layers"]:
        alpha = f"2^{r['alpha_log2']}" if "alpha_log2" in r else "-"
        head = f"{r['headroom_bits']:.2f}" if "headroom_bits" in r else "-"
        t.add_row(r["name"], r["layout"], "x".join(map(str, r["shape"])), str(r["bits"]), str(r["group_size"]),
                  alpha, head, f"{r['bytes']:,}", f"{r['fp16_bytes']:,}")
    tot = report["totals"]
    t.add_section()
    t.add_row("total", "", "", "", "", "", str(tot["min_headroom_bits"] if tot["min_headroom_bits"] is not None else "-"),
              f"{tot['quantized_bytes']:,}", f"{tot['quantized_fp16_bytes']:,}")
    _console().print(t)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--against", metavar="SOURCE", help="Compare with this source (default: the one OUT was made from).")
@click.option("--data-file", type=click.Path(path_type=Path), help="Sample text (default: text the source model writes).")
@click.option("--tokens", default=128, show_default=True, type=click.IntRange(min=2), help="Sample length in tokens.")
@click.option("--min-snr", default=5.0, show_default=True, help="Fail when a layer's output SNR (dB) is below this.")
@click.option("--min-top1", default=0.3, show_default=True, help="Fail when next-token top-1 agreement is below this.")
@click.option("--no-compare", is_flag=True, help="Check files and tensors only; do not run the models.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(out, against, data_file, tokens, min_snr, min_top1, no_compare, as_json):
    """Check OUT: sha256 of every file, tensor dtypes and shapes, the int32 bound, and
    (unless --no-compare) per-layer SNR, KL and top-1 agreement against the source.
    Exits 1 on any failure; a passing report is saved as OUT/verify.json.

    \b
    qconvert verify out/
    qconvert verify out/ --against ./Llama-3-8B --data-file sample.txt --json
    """
    from qconvert.verify import verify as run

    rep = run(out, against, data_file, tokens, compare_source=not no_compare, min_snr_db=min_snr, min_top1=min_top1)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
    else:
        click.echo(f"{out}: {rep.checked_files} files and {rep.checked_tensors} tensors checked")
        if rep.against:
            click.echo(f"against {rep.against} on {rep.sample_tokens} tokens: min layer SNR {rep.min_snr_db} dB, "
                       f"KL {rep.kl:.4f}, top-1 agreement {rep.top1_agreement:.3f}")
        for f in rep.failures:
            click.echo(f"FAIL {f}", err=True)
        click.echo("OK" if rep.ok else f"FAILED ({len(rep.failures)} problems)")
    if not rep.ok:
        sys.exit(1)


@cli.command()
def schemes():
    """List the scheme presets."""
    from rich.table import Table

    from qconvert.schemes_registry import list_presets

    t = Table(title="qconvert schemes")
    t.add_column("scheme")
    t.add_column("method")
    t.add_column("description")
    for s in list_presets():
        t.add_row(s.name, s.method, s.description)
    _console().print(t)


def main():
    cli(prog_name="qconvert")


if __name__ == "__main__":
    main()
