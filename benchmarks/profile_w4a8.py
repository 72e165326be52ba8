"""Hardware counters of the repacked W4A8 kernels on a Llama-3-8B q/o shape (4096 x 4096, g = 128),
read by Nsight Compute: where the prefill's main loop and the decode's fixed cost go, which
CUDA-event timings cannot say (docs/kernels.md, "Against the H200 measurement").

    python benchmarks/profile_w4a8.py --ncu-csv OUT/ncu_w4a8.csv [--ncu ncu]

runs itself under ``ncu --clock-control none`` (METHOD.md: leave the clocks alone) with the
sections below, on these launches, in this order: the prefill kernel at M = 4096 (IS, then FS),
the decode kernel at M = 1 (IS, then FS), the prefill kernel at M = 256 (IS, then FS), each
launched once.  Each case is one ncu process, whose CSV is appended to --ncu-csv as it ends (ncu
writes its results only on exit): a time budget that runs out keeps the cases already done (the
H200 run of 2026-12-04 lost all six launches of one ncu process to a 30 s budget).  ``--run`` is
the inner step ncu starts: one case's launch alone.  Needs cupy, an sm_80+ GPU and ncu on a
runtime that lets it read the counters (gpu_check.sh, part g)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "SchedulerStats", "WarpStateStats", "InstructionStats",
            "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats")
CASES = ((4096, "w4a8-is"), (4096, "w4a8-fs"), (1, "w4a8-is"), (1, "w4a8-fs"), (256, "w4a8-is"), (256, "w4a8-fs"))
N = K = 4096
G = 128


def ncu_command(ncu: str, csv: Path, case: int = 0) -> list[str]:
    """ncu on this script's ``--run --case case``: only the W4A8 GEMMs (not the per-token
    quantizer), every launch."""
    cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "--kernel-name", "regex:w4a8r_(prefill|decode)_",
           "--csv", "--page", "details", "--log-file", str(csv)]
    for s in SECTIONS:
        cmd += ["--section", s]
    return cmd + [sys.executable, str(Path(__file__).resolve()), "--run", "--case", str(case)]


def run_launch(case: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_kernels_w4a8_emulate import activations, make_layer

    from qconvert_kernels.w4a8 import cuda

    dev = torch.device("cuda")
    m, layout = CASES[case]
    prep = cuda.prepare(layout, {k: v.to(dev) for k, v in make_layer(N, K, G, layout, 7).items()}, G, dev)
    x = activations(m, K, torch.float16, 11).to(dev)
    cuda.linear(x, prep)  # the kernel is built on the host first; only the launch is profiled
    torch.cuda.synchronize()
    print(f"{layout} M={m}: {cuda.plan(m, prep, torch.cuda.get_device_properties(0).multi_processor_count).kernel}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ncu-csv", type=Path)
    ap.add_argument("--ncu", default="ncu")
    ap.add_argument("--run", action="store_true", help="the launches alone (what ncu starts)")
    ap.add_argument("--case", type=int, default=0, choices=range(len(CASES)), help="with --run: which of CASES")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this profiles the GPU kernels")
    if args.run:
        run_launch(args.case)
        return
    if args.ncu_csv is None:
        raise SystemExit("--ncu-csv FILE is required (or --run for the launches alone)")
    ncu = shutil.which(args.ncu) or next((str(p) for p in sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        raise SystemExit(f"{args.ncu} not found (Nsight Compute): nothing profiled")
    args.ncu_csv.unlink(missing_ok=True)
    part = args.ncu_csv.with_name(args.ncu_csv.name + ".case")
    failed = 0
    for i in range(len(CASES)):
        part.unlink(missing_ok=True)
        failed += subprocess.run(ncu_command(ncu, part, i), cwd=ROOT).returncode != 0
        if part.exists():
            with args.ncu_csv.open("a") as f:
                f.write(part.read_text())
            part.unlink()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
