"""Peak memory of `qconvert quantize` against model depth (a benchmark, not a test).

Writes two random-weight Llama checkpoints of one width (hidden 2048, intermediate 5632,
bf16 safetensors) with 4 and 16 decoder layers, quantizes each in a subprocess and reports
the peak resident set size (ru_maxrss from wait4) of each run, their ratio, and the
16-layer peak as a fraction of that checkpoint's bytes.

Targets: ratio <= 1.25 (memory does not grow with depth), fraction <= 0.35.

    python benchmarks/memory.py [--scheme is-w4a8-rtn] [--workdir DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000


def write_checkpoint(directory: Path, layers: int) -> int:
    """Stream a random bf16 Llama checkpoint to ``directory``; returns its weight bytes."""
    import torch
    from transformers import LlamaConfig

    from qconvert.formats.safetensors_io import ShardedWriter
    from qconvert.skeleton import build_skeleton

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                      tie_word_embeddings=False, dtype="bfloat16")
    directory.mkdir(parents=True)
    cfg.save_pretrained(directory)
    writer = ShardedWriter(directory, max_shard_bytes=1 << 30)
    gen = torch.Generator().manual_seed(layers)
    for name, p in build_skeleton(cfg).named_parameters():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.add(name, t)
        del t
    writer.close()
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def peak_rss_of(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0  # Linux reports KiB


def git_commit() -> str:
    """Short commit of the checkout, with "+dirty" when the work tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="is-w4a8-rtn")
    ap.add_argument("--workdir", type=Path, help="where to write checkpoints (default: a temporary directory)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--write", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:  # child mode: the parent never imports torch, so its memory stays out of the figures
        print(write_checkpoint(Path(args.write[0]), int(args.write[1])))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = {}
        for layers in (4, 16):
            src = Path(tmp) / f"llama-{layers}L"
            nbytes = int(subprocess.run([sys.executable, __file__, "--write", str(src), str(layers)],
                                        check=True, capture_output=True, text=True).stdout.split()[-1])
            cmd = [sys.executable, "-m", "qconvert.cli", "quantize", str(src), "--scheme", args.scheme,
                   "-o", str(Path(tmp) / f"out-{layers}L"), "-q"]
            rss, secs = peak_rss_of(cmd)
            rows[layers] = {"layers": layers, "checkpoint_bytes": nbytes, "peak_rss_bytes": rss, "seconds": round(secs, 1)}
    ratio = rows[16]["peak_rss_bytes"] / rows[4]["peak_rss_bytes"]
    fraction = rows[16]["peak_rss_bytes"] / rows[16]["checkpoint_bytes"]
    print(f"{'layers':>6} {'checkpoint MB':>14} {'peak RSS MB':>12} {'seconds':>8}")
    for r in rows.values():
        print(f"{r['layers']:>6} {r['checkpoint_bytes'] / 1e6:>14.1f} {r['peak_rss_bytes'] / 1e6:>12.1f} {r['seconds']:>8.1f}")
    print(f"peak RSS ratio 16L/4L: {ratio:.3f} (target <= 1.25) {'PASS' if ratio <= 1.25 else 'FAIL'}")
    print(f"16L peak / checkpoint bytes: {fraction:.3f} (target <= 0.35) {'PASS' if fraction <= 0.35 else 'FAIL'}")
    result = {
        "benchmark": "memory", "scheme": args.scheme, "runs": list(rows.values()),
        "ratio_16_over_4": round(ratio, 4), "fraction_of_checkpoint": round(fraction, 4),
        "targets": {"ratio": 1.25, "fraction": 0.35}, "machine": platform.machine(),
        "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
        "commit": git_commit(),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
