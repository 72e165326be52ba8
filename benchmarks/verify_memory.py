"""Peak memory of `qconvert verify` with and without streaming the source (a benchmark, not a test).

Writes a random-weight checkpoint of a ``qconvert.bench.SYNTHETIC`` shape (bf16 safetensors,
with a word-level tokenizer and a seeded random text: benchmarks/quantize_speed.py), quantizes
it with is-w4a8-rtn, then runs `qconvert verify OUT --data-file TEXT` in a child process per
mode and reports each one's peak RSS (wait4), time and report:

  whole    --no-stream: the source model loaded whole, in float32
  stream   --stream: one float32 decoder block at a time (qconvert/verify.py)

A mode whose float32 source would not fit in this machine's RAM is not run (it would be
killed); the table says so.  On random weights top-1 agreement means little (the logits are
nearly flat), so the runs pass --min-top1 0; the SNR and KL are reported as measured.

    python benchmarks/verify_memory.py --layers 2 --json benchmarks/results/verify_memory_2L.json
    python benchmarks/verify_memory.py --modes stream --workdir /tmp/vm8b --json benchmarks/results/verify_memory_8b.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quantize_speed import _environment, _synthetic_checkpoint  # noqa: E402

MODES = {"whole": "--no-stream", "stream": "--stream"}


def run_child(cmd: list[str], stdout: Path) -> dict:
    """One child process, its stdout into ``stdout``: its peak RSS (wait4), its peak anonymous RSS
    (``RssAnon`` of /proc/PID/status, read every 50 ms: the memory the kernel cannot take back by
    dropping file pages, which the mapped safetensors files add to the RSS), seconds, exit status."""
    t0 = time.perf_counter()
    peak_anon = [0]
    with open(stdout, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f)
        done = threading.Event()

        def poll():
            while not done.is_set():
                try:
                    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                        if line.startswith("RssAnon:"):
                            peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
                except OSError:
                    pass
                done.wait(0.05)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        watcher.join()
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "peak_anon_rss_bytes": peak_anon[0],
            "seconds": round(time.perf_counter() - t0, 1), "exit_status": os.waitstatus_to_exitcode(status)}


def float32_bytes(src: Path) -> int:
    """The float32 size of the checkpoint's tensors (twice its bf16 files' payload)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return 4 * n


def ram_total() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", help="qconvert.bench.SYNTHETIC shape")
    ap.add_argument("--layers", type=int, help="decoder blocks (default: the shape's own)")
    ap.add_argument("--modes", default="whole,stream", help="comma-separated: whole, stream")
    ap.add_argument("--tokens", type=int, default=128, help="verify --tokens")
    ap.add_argument("--workdir", type=Path, help="keep the checkpoint and OUT here (reused when present)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--modes: choose from {', '.join(MODES)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="verify-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src_dir, ckpt_bytes = _synthetic_checkpoint(work / "src", args.shape, args.layers, "cpu")
    src = Path(src_dir)
    write_s = time.perf_counter() - t0
    out = work / "out"
    quant = None
    if not (out / "qconvert.json").is_file():
        cmd = [sys.executable, "-m", "qconvert.cli", "quantize", str(src), "--scheme", "is-w4a8-rtn", "-o", str(out),
               "-q", "--force"]
        quant = run_child(cmd, work / "quantize.log")
        if quant["exit_status"] != 0:
            raise SystemExit(f"{' '.join(cmd)} failed with exit status {quant['exit_status']}")
    need = float32_bytes(src)
    rows = []
    for mode in modes:
        row = {"mode": mode, "flag": MODES[mode]}
        if mode == "whole" and need > 0.9 * ram_total():
            row["skipped"] = (f"the float32 source takes {need / 1e9:.1f} GB and this machine has "
                              f"{ram_total() / 1e9:.1f} GB of RAM")
            rows.append(row)
            continue
        cmd = [sys.executable, "-m", "qconvert.cli", "verify", str(out), "--against", str(src), "--data-file",
               str(src / "calib.txt"), "--tokens", str(args.tokens), "--min-top1", "0", MODES[mode], "--json"]
        row.update(run_child(cmd, work / f"verify_{mode}.json"))
        rep = json.loads((work / f"verify_{mode}.json").read_text())
        row.update(ok=rep["ok"], streamed=rep["streamed"],
                   sample_tokens=rep["sample_tokens"], min_snr_db=rep["min_snr_db"], kl=rep["kl"],
                   top1_agreement=rep["top1_agreement"], layers=len(rep["layers"]), failures=rep["failures"],
                   layer_snr_db={r["name"]: r["snr_db"] for r in rep["layers"]})
        rows.append(row)
    ran = {r["mode"]: r for r in rows if "skipped" not in r}
    same = None
    if len(ran) == 2:
        same = all(ran["whole"][k] == ran["stream"][k] for k in ("kl", "top1_agreement", "layer_snr_db"))
    print(f"{args.shape}, {args.layers or 'all'} layers: checkpoint {ckpt_bytes / 1e9:.2f} GB (bf16), "
          f"float32 source {need / 1e9:.2f} GB, RAM {ram_total() / 1e9:.1f} GB")
    if quant:
        print(f"quantize is-w4a8-rtn: {quant['seconds']} s, peak RSS {quant['peak_rss_bytes'] / 1e9:.2f} GB "
              f"(anonymous {quant['peak_anon_rss_bytes'] / 1e9:.2f} GB)")
    print(f"{'mode':<7} {'peak RSS GB':>11} {'anon GB':>8} {'seconds':>8} {'min SNR dB':>10} {'KL':>10} {'ok':>4}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['mode']:<7} not run: {r['skipped']}")
        else:
            print(f"{r['mode']:<7} {r['peak_rss_bytes'] / 1e9:>11.2f} {r['peak_anon_rss_bytes'] / 1e9:>8.2f} "
                  f"{r['seconds']:>8.1f} {r['min_snr_db']:>10} {r['kl']:>10.3g} {str(r['ok']):>4}")
    if same is not None:
        print(f"streamed report equals the whole one (KL, top-1, every layer's SNR): {same}")
    result = {"benchmark": "verify_memory", "shape": args.shape, "layers": args.layers, "checkpoint_bytes": ckpt_bytes,
              "float32_source_bytes": need, "ram_bytes": ram_total(), "write_seconds": round(write_s, 1),
              "quantize": quant, "runs": rows, "streamed_equals_whole": same, "environment": _environment()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
