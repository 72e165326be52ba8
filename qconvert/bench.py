"""`qconvert bench`: kernel speed against cuBLAS FP16, and end-to-end prefill / decode speed.

Kernel timing (``kernel_bench``), per (shape, M, kernel):
  * inputs rotate over enough copies (activations *and* weights) that their total is at least
    3x the GPU's L2, so no run finds its operands cached by the previous one;
  * warm-up runs first (module load, clocks), then ``runs`` samples; a sample is one replay of
    a CUDA graph holding ``reps`` back-to-back launches, timed with CUDA events and divided by
    ``reps`` — the graph removes Python's launch cost (about 10 µs a launch through CuPy or
    torch), which would otherwise dominate the small-M rows; if graph capture fails the
    samples are eager launches and the row says ``timing: eager``; ``reps`` (20 at most) is
    cut to what makes a sample about 2 ms long, but not below the operand sets' count
    (``sample_reps``), so a 1.5 ms prefill GEMM on 2 sets is timed over 2 launches a sample, not
    20 (the row records its ``reps``);
  * the reported figure is the median sample; TOPS = 2·M·N·K / t, GB/s = bytes the kernel
    must move (activations, weights, scales, output) / t.

End-to-end (``model_bench``): prefill tokens/s of one forward over ``prefill`` tokens, and
decode tokens/s of ``new_tokens`` greedy steps at each batch size (our own loop over the KV
cache, so no sampling or stopping logic is timed), for the quantized model and its float
original on the same device and runtime.  On a CPU the quantized model runs the exact torch
reference (qconvert_kernels/w4a8/reference.py), which is written for exactness, not speed: such
rows are labelled ``cpu-reference`` and say nothing about the kernels.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.errors import QConvertError

# (label, N, K) of the fused linears of one decoder block
KERNEL_SHAPES = {
    "llama3-8b": [("q/o_proj", 4096, 4096), ("qkv_proj", 6144, 4096), ("gate_up_proj", 28672, 4096), ("down_proj", 4096, 14336)],
    "smollm2-135m": [("o_proj", 576, 576), ("qkv_proj", 960, 576), ("gate_up_proj", 3072, 576), ("down_proj", 576, 1536)],
}
DEFAULT_M = (1, 16, 64, 256, 1024, 4096)
KERNEL_SCHEMES = ("is-w4a8", "zqfp-w4a8", "quik-w4a4", "illm-w8a8")  # kernel families benchmarked by --kernels (IS against FS
# and cuBLAS; ZeroQuant-FP: FP4 x FP8 and FP8 x FP8 against cuBLAS; QUIK: whole W4A4 / W8A8 layers against cuBLAS)

# random-weight models of real shapes for --synthetic (Llama architecture)
SYNTHETIC = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def gpu_available() -> bool:
    from qconvert_kernels.w4a8 import cuda as kcuda

    return kcuda.available()


def no_gpu_message(what: str, command: str = "qconvert bench OUT") -> str:
    return (f"{what} needs an NVIDIA GPU (sm_80 or newer) with cupy installed (pip install 'qconvert[cuda]'); "
            f"none is usable here. `{command} --device cpu` runs the CPU reference path instead.")


def environment(device: torch.device) -> dict:
    """Where a result was measured: device name, software versions, date, commit."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, cuda=torch.version.cuda, capability=f"sm_{props.major}{props.minor}")
        try:
            import cupy

            env["cupy"] = cupy.__version__
        except ImportError:
            pass
    else:
        env.update(device=f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    return env


def _git_commit() -> str | None:
    """$COMMIT where the caller set it (benchmarks/gpu_check.sh on a tree copied to a GPU machine,
    whose .git, if it has one, may name an older commit: the H200 rerun of 2026-12-04 ran ba0b5d1's
    tree and git there answered caa2c67); else the checkout's short commit; else None."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        commit = res.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or None


# ---------------------------------------------------------------------------------------------
# kernels


@dataclass
class Timing:
    median_us: float
    samples: int
    mode: str  # "cuda-graph" or "eager"
    reps: int = 1  # launches per sample


SAMPLE_US = 2000.0  # what a sample's launches should take together (sample_reps)


def sample_reps(launch_us: float, most: int, n_sets: int = 1) -> int:
    """Launches per timed sample: enough for about SAMPLE_US of work, between 1 and ``most``, and
    never fewer than the operand sets (up to ``most``), so one sample still cycles through every
    set and finds none of its operands in the L2 from the launch before."""
    return max(1, min(most, max(math.ceil(SAMPLE_US / max(launch_us, 1e-3)), n_sets)))


def _time_cuda(launch, n_sets: int, runs: int, warmup: int, reps: int) -> Timing:
    """Median µs per launch of ``launch(i)`` (i cycles over the operand sets), see the module doc."""
    for i in range(warmup):
        launch(i % n_sets)
    torch.cuda.synchronize()
    # one eager launch per operand set sizes the sample (launch cost included: an upper bound)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for i in range(n_sets):
        launch(i)
    t1.record()
    torch.cuda.synchronize()
    reps = sample_reps(t0.elapsed_time(t1) * 1000.0 / n_sets, reps, n_sets)
    graph = None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(reps):  # one eager pass on the capture stream first (allocator, handles)
                launch(i % n_sets)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                launch(i % n_sets)
        graph.replay()
        torch.cuda.synchronize()
    except Exception:  # any capture problem: fall back to eager launches, labelled as such
        graph = None
        torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for r in range(runs):
        starts[r].record()
        if graph is not None:
            graph.replay()
        else:
            for i in range(reps):
                launch((r * reps + i) % n_sets)
        ends[r].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1000.0 / reps for s, e in zip(starts, ends)]
    return Timing(statistics.median(samples), runs, "cuda-graph" if graph is not None else "eager", reps)


def _operand_sets(set_bytes: int, device: torch.device, max_sets: int = 64) -> int:
    """How many copies of the operands make at least 3x the L2 (at least 2, at most ``max_sets``)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
    return max(2, min(max_sets, math.ceil(3 * l2 / max(set_bytes, 1))))


def kernel_rows(label: str, n: int, k: int, m: int, device: torch.device, runs: int = 50, warmup: int = 10,
                group_size: int = 128, reps: int = 20) -> list[dict]:
    """Time cuBLAS FP16 and whole W4A8-IS / W4A8-FS linears (``qconvert_kernels.w4a8.cuda.linear``:
    fp16 activations in, the per-token int8 quantization included; decode kernel for M <= 64,
    quantizer + prefill kernel above) for one (M, N, K); above M = 64 also W4A8-IS on the prefill's
    64-token tiles (``w4a8-is-bm64``, two CTAs per SM: its time against the 128-token one the layers
    run, and whether its output has the same bits).  Each row also gets the roofline time of
    its arithmetic on the device (qconvert_kernels/roofline.py; None if the GPU is not modelled)
    and the fraction of it reached."""
    from qconvert_kernels import roofline
    from qconvert_kernels.w4a8 import cuda as kcuda

    g = group_size
    kp = -(-k // g) * g
    n_groups = kp // g
    gen = torch.Generator(device=device).manual_seed(m * 131 + n * 7 + k)
    fp16_bytes = m * k * 2 + n * k * 2 + m * n * 2
    w4_bytes = m * k * 2 + n * kp // 2 + n * n_groups * 2 + n * 4 + m * n * 2
    sets = _operand_sets(fp16_bytes, device)  # the int4 operands are smaller: more copies of them
    w4_sets = _operand_sets(w4_bytes, device, max_sets=16)
    xs = [torch.randn((m, k), generator=gen, device=device, dtype=torch.float16) for _ in range(max(sets, w4_sets))]
    ws = [torch.randn((n, k), generator=gen, device=device, dtype=torch.float16) * 0.02 for _ in range(sets)]
    rows = []
    dev_name = torch.cuda.get_device_name(device)

    def row(kernel, timing: Timing, bytes_moved: int, ops: int, n_sets: int):
        us = timing.median_us
        roof = roofline.roofline_for(dev_name, n, k, m, kernel, g) or {}
        rows.append({"shape": label, "N": n, "K": k, "M": m, "kernel": kernel, "us": round(us, 3),
                     "tops": round(ops / (us * 1e-6) / 1e12, 3), "gbps": round(bytes_moved / (us * 1e-6) / 1e9, 1),
                     "timing": timing.mode, "samples": timing.samples, "reps": timing.reps, "operand_sets": n_sets,
                     "roofline_us": roof.get("roofline_us"),
                     "roofline_frac": round(roof["roofline_us"] / us, 3) if roof else None})

    rows_ops = 2 * m * n * k
    row("cublas-fp16", _time_cuda(lambda i: torch.nn.functional.linear(xs[i], ws[i]), sets, runs, warmup, reps),
        fp16_bytes, rows_ops, sets)
    ws.clear()  # free before the next operands are made
    shape = torch.tensor([n, k])
    layers = []
    for _ in range(w4_sets):
        # integer scales in [1, 128] with alpha 2^7: 127 * 8 * g * 128 * G < 2^31 for K <= 16384, no wrap
        iscale = torch.randint(1, 129, (n, n_groups), generator=gen, device=device, dtype=torch.int32)
        layers.append({"qweight": torch.randint(0, 256, (n, kp // 2), generator=gen, device=device, dtype=torch.uint8),
                       "iscale": iscale, "scales": (iscale.float() / 128 * 0.01).half(), "shape": shape,
                       "cscale": torch.rand(n, generator=gen, device=device) * 0.01,
                       "alpha_log2": torch.tensor([7], dtype=torch.int32)})
    for kernel in ("w4a8-is", "w4a8-fs"):
        prepared = [kcuda.prepare(kernel, t, g, device) for t in layers]
        row(kernel, _time_cuda(lambda i: kcuda.linear(xs[i], prepared[i]), w4_sets, runs, warmup, reps),
            w4_bytes - (0 if kernel == "w4a8-is" else n * 4), rows_ops, w4_sets)
        if kernel == "w4a8-is" and m > kcuda.DECODE_MAX_M:
            # the prefill's 64-token tiles (two CTAs per SM), beside the 128-token ones the layers run;
            # integer sums in any order: the same bits, checked on one operand set
            row("w4a8-is-bm64", _time_cuda(lambda i: kcuda.linear(xs[i], prepared[i], prefill_bm=64), w4_sets, runs,
                                           warmup, reps), w4_bytes, rows_ops, w4_sets)
            rows[-1]["same_bits_as_bm128"] = bool(torch.equal(kcuda.linear(xs[0], prepared[0]),
                                                              kcuda.linear(xs[0], prepared[0], prefill_bm=64)))
        prepared.clear()
    by = {r["kernel"]: r["us"] for r in rows}
    for r in rows:
        r["vs_cublas"] = round(by["cublas-fp16"] / r["us"], 3) if r["kernel"].startswith("w4a8") else None
        if r["kernel"].startswith("w4a8"):
            r["vs_cublas_with_quant"] = r["vs_cublas"]  # the linear includes its activation quantization
        if r["kernel"] == "w4a8-is":
            r["is_vs_fs"] = round(by["w4a8-fs"] / r["us"], 3)
        if r["kernel"] == "w4a8-is-bm64":
            r["vs_bm128"] = round(by["w4a8-is"] / r["us"], 3)
    return rows


def _recorder(rows: list, label: str, n: int, k: int, m: int, **extra):
    """``row(kernel, timing, bytes_moved, ops)`` appending one result row (µs, TOPS, GB/s) to ``rows``."""
    def row(kernel, timing: Timing, bytes_moved: int, ops: int):
        us = timing.median_us
        rows.append({"shape": label, "N": n, "K": k, "M": m, "kernel": kernel, "us": round(us, 3),
                     "tops": round(ops / (us * 1e-6) / 1e12, 3), "gbps": round(bytes_moved / (us * 1e-6) / 1e9, 1),
                     "timing": timing.mode, "samples": timing.samples, "reps": timing.reps, **extra})
    return row


def _fp16_baseline(label: str, n: int, k: int, m: int, device: torch.device, runs: int, warmup: int, reps: int,
                   set_bytes: int = 0, **extra):
    """What every scheme's kernel rows start from: a seeded generator, the operand-set count,
    fp16 activations [M, K], and the rows list with the cuBLAS FP16 row already timed.
    Returns (gen, sets, xs, rows, row)."""
    gen = torch.Generator(device=device).manual_seed(m * 131 + n * 7 + k)
    fp16_bytes = m * k * 2 + n * k * 2 + m * n * 2
    sets = _operand_sets(max(fp16_bytes, set_bytes), device)
    xs = [torch.randn((m, k), generator=gen, device=device, dtype=torch.float16) for _ in range(sets)]
    ws = [torch.randn((n, k), generator=gen, device=device, dtype=torch.float16) * 0.02 for _ in range(sets)]
    rows = []
    row = _recorder(rows, label, n, k, m, operand_sets=sets, **extra)
    row("cublas-fp16", _time_cuda(lambda i: torch.nn.functional.linear(xs[i], ws[i]), sets, runs, warmup, reps),
        fp16_bytes, 2 * m * n * k)
    return gen, sets, xs, rows, row


def zqfp_kernel_rows(label: str, n: int, k: int, m: int, device: torch.device, runs: int = 50, warmup: int = 10,
                     group_size: int = 128, reps: int = 20) -> list[dict]:
    """Time cuBLAS FP16, the FP8 quantizer, FP4 x FP8 (fp4-fp8) and FP8 x FP8 (fp8-fp8) for one (M, N, K),
    and at M <= 64 fp4-fp8 as the runtime runs it there, ``fp4-fp8-decode``: the repacked decode
    kernel (fp8/fp8_repacked.cu, the E4M3 quantizer fused in: one launch; weights repacked before the
    timing, as at load time), its ratio to cuBLAS with nothing added, and above 64 the prefill's
    ``fp4-fp8-widen`` and ``fp4-fp8-prefill`` (``_zq_prefill_rows``); fp8-fp8 as the runtime runs it
    at every M, ``fp8-fp8-scaled`` (torch._scaled_mm with per-row scales, the quantizer not included),
    beside the first kernel.  LoRC (a rank-r torch GEMM beside the kernel) is not included."""
    from qconvert_kernels.fp8 import cuda as cuda_fp8
    from qconvert_kernels.w4a8 import cuda as kcuda

    g = group_size
    kp = -(-k // g) * g
    n_groups = kp // g
    gen, sets, xs, rows, row = _fp16_baseline(label, n, k, m, device, runs, warmup, reps, set_bytes=m * kp + n * kp + m * n * 2)
    ops = 2 * m * n * k
    row("quantize-fp8", _time_cuda(lambda i: cuda_fp8.quantize_per_token_fp8(xs[i], kp), sets, runs, warmup, reps),
        m * k * 2 + m * kp + m * 4, 0)
    quantized = [cuda_fp8.quantize_per_token_fp8(x, kp) for x in xs]
    xs.clear()
    qws = [torch.randint(0, 256, (n, kp // 2), generator=gen, device=device, dtype=torch.uint8) for _ in range(sets)]
    sexps = [torch.randint(-4, 1, (n, n_groups), generator=gen, device=device, dtype=torch.int8) for _ in range(sets)]
    cscale = torch.rand(n, generator=gen, device=device) * 0.01
    row("fp4-fp8", _time_cuda(lambda i: cuda_fp8.fp4_fp8_gemm(*quantized[i], qws[i], sexps[i], cscale, g, torch.float16),
                              sets, runs, warmup, reps), m * kp + n * kp // 2 + n * n_groups + n * 4 + m * n * 2, ops)
    if m <= kcuda.DECODE_MAX_M:
        preps = [kcuda.prepare("fp4-fp8", {"qweight": qws[i], "sexp": sexps[i], "cscale": cscale, "shape": torch.tensor([n, k])},
                               g, device) for i in range(sets)]
        x16 = [torch.randn((m, k), generator=gen, device=device, dtype=torch.float16) for _ in range(sets)]
        row("fp4-fp8-decode", _time_cuda(lambda i: kcuda.linear(x16[i], preps[i]), sets, runs, warmup, reps),
            m * k * 2 + n * kp // 2 + n * n_groups + n * 4 + m * n * 2, ops)
        preps.clear()
    else:
        _zq_prefill_rows(row, quantized, qws, sexps, cscale, n, k, g, m, device, sets, runs, warmup, reps)
    qws.clear()
    w8 = [torch.randint(0, 0x7F, (n, kp), generator=gen, device=device, dtype=torch.uint8).view(torch.float8_e4m3fn)
          for _ in range(sets)]
    row("fp8-fp8", _time_cuda(lambda i: cuda_fp8.fp8_fp8_gemm(*quantized[i], w8[i], cscale, torch.float16),
                              sets, runs, warmup, reps), m * kp + n * kp + n * 4 + m * n * 2, ops)
    preps8 = [cuda_fp8.prepare_fp8_fp8(w, cscale, device) for w in w8]
    if preps8[0] is not None and preps8[0].runs(torch.float16):  # the runtime's fp8-fp8: torch._scaled_mm, per-row scales
        row("fp8-fp8-scaled", _time_cuda(lambda i: cuda_fp8.fp8_fp8_scaled(*quantized[i], preps8[i], torch.float16),
                                         sets, runs, warmup, reps), m * kp + n * kp + n * 4 + m * n * 2, ops)
    by = {r["kernel"]: r["us"] for r in rows}
    for r in rows:
        if r["kernel"] in ("fp4-fp8", "fp8-fp8", "fp4-fp8-prefill", "fp8-fp8-scaled"):
            r["vs_cublas"] = round(by["cublas-fp16"] / r["us"], 3)
            r["vs_cublas_with_quant"] = round(by["cublas-fp16"] / (r["us"] + by["quantize-fp8"]), 3)
        elif r["kernel"] == "fp4-fp8-decode":  # the quantizer is inside its launch
            r["vs_cublas"] = r["vs_cublas_with_quant"] = round(by["cublas-fp16"] / r["us"], 3)
    return rows


def _zq_prefill_rows(row, quantized, qws, sexps, cscale, n, k, g, m, device, sets, runs, warmup, reps) -> None:
    """fp4-fp8 above 64 tokens as the runtime runs it: ``fp4-fp8-widen`` (the repacked weights widened
    to E4M3, one launch) and ``fp4-fp8-prefill`` (that plus torch._scaled_mm with per-row scales, the
    quantizer not included); nothing where the device's torch has no row-wise FP8 GEMM."""
    from qconvert_kernels.w4a8 import cuda as kcuda

    kp = qws[0].shape[1] * 2
    preps = [kcuda.prepare("fp4-fp8", {"qweight": qws[i], "sexp": sexps[i], "cscale": cscale, "shape": torch.tensor([n, k])},
                           g, device) for i in range(sets)]
    if preps[0].widen_exp is None:
        return
    w_bytes = n * kp // 2 + n * (kp // g) + 2 * n * preps[0].kq  # read the FP4 copy, write and read E4M3
    row("fp4-fp8-widen", _time_cuda(lambda i: kcuda.widen_zq(preps[i]), sets, runs, warmup, reps), n * kp // 2 + n * preps[0].kq, 0)
    xq8 = [torch.nn.functional.pad(xq.view(torch.uint8), (0, preps[0].kq - kp)).view(torch.float8_e4m3fn) for xq, _ in quantized]
    row("fp4-fp8-prefill", _time_cuda(lambda i: kcuda.zq_prefill(xq8[i], quantized[i][1], preps[i], torch.float16), sets,
                                      runs, warmup, reps), m * preps[0].kq + w_bytes + m * n * 2, 2 * m * n * k)


def quik_kernel_rows(label: str, n: int, k: int, m: int, device: torch.device, runs: int = 50, warmup: int = 10,
                     reps: int = 20, outliers: int | None = None) -> list[dict]:
    """Time cuBLAS FP16 and QUIK layers for one (M, N, K): the split-and-quantize kernel alone,
    the integer GEMM alone (its epilogue adding a given outlier product), and whole layers
    ``quik-w4a4`` / ``quik-w8a8`` (split, outlier product, GEMM) as the runtime runs them (at
    M <= 8 the outlier product is made in the split's launch, ``quik-split-outliers``; above,
    by cuBLAS); the split kernel the layer does not use beside the one it uses (``quik-split-row``
    at M <= 64, ``quik-split-wide`` above: ``cuda.default_split``); at M <= 8 the GEMMs are the
    GEMVs and the tile kernels are timed beside them (``quik-w8a8-gemm-tile``, and off sm_90
    ``quik-w4a4-gemm-tile``), above 8 W8A8's is torch._int_mm and its epilogue, the tile kernel beside
    it where N % 8 == 0; the 4-bit layer on the device's path (s4 on sm_80 .. sm_89, s8r on sm_90+: the repacked
    W4A8 decode and prefill kernels, whose weights are repacked before the timing as the runtime does
    at load time), and on sm_90+ also the first design's 64 x 64 GEMM (``quik-w4a4-gemm-s8``) beside it.
    ``outliers``: fp16 channels, default the "auto" rule (256 for K >= 4096)."""
    from qconvert.layouts.quik import auto_outliers
    from qconvert_kernels.quik import cuda as cuda_quik
    from qconvert_kernels.quik.reference import padded_base

    n_out = auto_outliers(k) if outliers is None else outliers
    kbp = padded_base(k - n_out)
    path = cuda_quik.int4_path(device)
    gen, sets, xs, rows, row = _fp16_baseline(label, n, k, m, device, runs, warmup, reps, outliers=n_out, int4_path=path)
    out_idx = torch.sort(torch.randperm(k, generator=gen, device=device)[:n_out]).values
    keep = torch.ones(k, dtype=torch.bool, device=device)
    keep[out_idx] = False
    base_idx = torch.nonzero(keep).flatten()
    ops = 2 * m * n * k
    wscale = torch.rand(n, generator=gen, device=device) * 0.01
    wsum = torch.randint(-1000, 1000, (n,), generator=gen, device=device, dtype=torch.int32)
    w_outs = [torch.randn((n, n_out), generator=gen, device=device, dtype=torch.float16) * 0.02 for _ in range(sets)]
    for bits in (4, 8):
        pack = bits == 4 and path == "s4" and m > cuda_quik.GV_ROWS  # at M <= 8 the GEMV takes the codes unpacked
        qws = [torch.randint(-128, 128, (n, kbp // 2 if bits == 4 else kbp), generator=gen, device=device,
                             dtype=torch.int8).view(torch.uint8 if bits == 4 else torch.int8) for _ in range(sets)]
        repacked = bits == 4 and path == "s8r"
        preps = [cuda_quik.prepare_repacked(q, wscale, wsum, device) for q in qws] if repacked else [None] * sets
        width = preps[0].kq if repacked else None
        xq_bytes = m * (kbp // 2 if pack else (width or kbp))
        w_bytes = n * (kbp // 2 if bits == 4 else kbp) + n * n_out * 2 + n * 8
        name = f"quik-w{bits}a{bits}"
        if bits == 4:
            timed = lambda f: _time_cuda(f, sets, runs, warmup, reps)  # noqa: E731
            _quik_split_rows(row, timed, xs, base_idx, out_idx, w_outs, pack, width or kbp, width, xq_bytes)
        splits = [cuda_quik.split_quantize(x, base_idx, out_idx, bits, pack, width=width) for x in xs]
        y_outs = [torch.matmul(sp[3], w.t()) if n_out else None for sp, w in zip(splits, w_outs)]
        if repacked:
            gemm = lambda i: cuda_quik.quik_gemm_repacked(*splits[i][:3], preps[i], y_outs[i], torch.float16)  # noqa: E731
        else:
            gemm = lambda i: cuda_quik.quik_gemm(*splits[i][:3], qws[i], wscale, wsum, y_outs[i], bits, torch.float16)  # noqa: E731
        row(f"{name}-gemm", _time_cuda(gemm, sets, runs, warmup, reps), xq_bytes + w_bytes + m * n * 4, 2 * m * n * kbp)
        beside = m <= cuda_quik.GV_ROWS or cuda_quik.default_gemm(m, n, bits) == "int_mm"  # the GEMV or torch._int_mm runs
        if beside and not repacked:  # the 64 x 64 tile kernel beside it
            tiles = ([(cuda_quik.split_quantize(x, base_idx, out_idx, 4, True)[:3]) for x in xs] if path == "s4" and bits == 4
                     else [sp[:3] for sp in splits])  # the s4 tile kernel takes the codes packed
            row(f"{name}-gemm-tile", _time_cuda(lambda i: cuda_quik.quik_gemm(*tiles[i], qws[i], wscale, wsum, y_outs[i], bits,
                                                                             torch.float16, kernel="tile"),
                                                sets, runs, warmup, reps), xq_bytes + w_bytes + m * n * 4, 2 * m * n * kbp)
            tiles.clear()
        if repacked:  # the first design's s8 kernel on the same weights and codes (xq's first Kbp columns)
            s8 = [(sp[0][:, :kbp].contiguous(), sp[1], sp[2]) for sp in splits]
            row(f"{name}-gemm-s8", _time_cuda(lambda i: cuda_quik.quik_gemm(*s8[i], qws[i], wscale, wsum, y_outs[i], 4,
                                                                           torch.float16, kernel="tile"), sets, runs, warmup, reps),
                m * kbp + w_bytes + m * n * 4, 2 * m * n * kbp)
            s8.clear()
        splits.clear()
        y_outs.clear()
        row(name, _time_cuda(lambda i: cuda_quik.quik_linear(xs[i], base_idx, out_idx, qws[i], wscale, wsum, w_outs[i], bits,
                                                             prepared=preps[i]),
                             sets, runs, warmup, reps), m * k * 2 + w_bytes + m * n * 2, ops)
        qws.clear()
        preps.clear()
    by = {r["kernel"]: r["us"] for r in rows}
    for r in rows:
        if r["kernel"] in ("quik-w4a4", "quik-w8a8", "quik-w4a4-gemm", "quik-w8a8-gemm", "quik-w4a4-gemm-s8",
                           "quik-w8a8-gemm-tile", "quik-w4a4-gemm-tile"):
            r["vs_cublas"] = round(by["cublas-fp16"] / r["us"], 3)
    return rows


def _quik_split_rows(row, timed, xs, base_idx, out_idx, w_outs, pack: bool, kq: int, width, xq_bytes: int) -> None:
    """``quik_kernel_rows``' split rows: the split the layer uses (``quik-split``), the other split
    kernel beside it where both apply (``quik-split-row`` / ``quik-split-wide``), and at M <= 8 the
    split with the outlier product in its launch (``quik-split-outliers``); ``kq`` the xq row width."""
    from qconvert_kernels.quik import cuda as cuda_quik

    (m, k), n_out, n = xs[0].shape, out_idx.numel(), w_outs[0].shape[0]
    split_bytes = m * k * 2 + xq_bytes + m * n_out * 2 + m * 8
    row("quik-split", timed(lambda i: cuda_quik.split_quantize(xs[i], base_idx, out_idx, 4, pack, width=width)), split_bytes, 0)
    if kq <= cuda_quik.WIDE_MAX_KB:  # the other split kernel beside the default one
        other = "row" if cuda_quik.default_split(m, kq) == "wide" else "wide"
        row(f"quik-split-{other}", timed(lambda i: cuda_quik.split_quantize(xs[i], base_idx, out_idx, 4, pack, width=width,
                                                                            kernel=other)), split_bytes, 0)
    if cuda_quik.fuses_outliers(m, kq, n_out):  # what the layer launches at decode: split and product
        row("quik-split-outliers", timed(lambda i: cuda_quik.split_outliers(xs[i], base_idx, out_idx, w_outs[i], 4, pack,
                                                                            width=width)),
            split_bytes + n * n_out * 2 + m * n * 2, 2 * m * n * n_out)


def illm_kernel_rows(label: str, n: int, k: int, m: int, device: torch.device, runs: int = 50, warmup: int = 10,
                     reps: int = 20) -> list[dict]:
    """Time cuBLAS FP16 and I-LLM's DI-MatMul (int8 x int8, dyadic epilogue, int64 out) as the model
    runs it (``illm.cuda.default_matmul``: the GEMV at M <= 8, torch._int_mm and illm_dyadic_rows
    above) with and without the per-token requantization of its output, for one (M, N, K), and the
    64 x 64 tile kernel beside it (``illm-matmul-w8-tile``) where it is not the default."""
    from qconvert_kernels.illm import cuda as cuda_illm

    matmul = cuda_illm.default_matmul(m, n, 8)  # recorded in every row: the rows of illm-matmul-w8 name it
    gen, sets, xs, rows, row = _fp16_baseline(label, n, k, m, device, runs, warmup, reps, matmul=matmul)
    ops = 2 * m * n * k
    xs.clear()
    xq = [torch.randint(-127, 128, (m, k), generator=gen, device=device, dtype=torch.int8) for _ in range(sets)]
    qw = [torch.randint(-127, 128, (n, k), generator=gen, device=device, dtype=torch.int8) for _ in range(sets)]
    wm = torch.randint(2**15, 2**16, (n,), generator=gen, device=device, dtype=torch.int32)
    wk = torch.randint(24, 30, (n,), generator=gen, device=device, dtype=torch.int32)
    acc_bytes = m * n * 8 if matmul == "int_mm" else 0  # its int32 product written and read
    row("illm-matmul-w8", _time_cuda(lambda i: cuda_illm.illm_matmul(xq[i], qw[i], wm, wk, 8), sets, runs, warmup, reps),
        m * k + n * k + m * n * 8 + acc_bytes, ops)
    if matmul != "tile":  # the GEMV or cuBLASLt runs; the 64 x 64 tile kernel beside it
        row("illm-matmul-w8-tile", _time_cuda(lambda i: cuda_illm.illm_matmul(xq[i], qw[i], wm, wk, 8, kernel="tile"),
                                              sets, runs, warmup, reps), m * k + n * k + m * n * 8, ops)
    row("illm-w8a8", _time_cuda(lambda i: cuda_illm.requant_rows(cuda_illm.illm_matmul(xq[i], qw[i], wm, wk, 8), 127),
                                sets, runs, warmup, reps), m * k + n * k + m * n * 17 + acc_bytes, ops)
    by = {r["kernel"]: r["us"] for r in rows}
    for r in rows:
        if r["kernel"] != "cublas-fp16":
            r["vs_cublas"] = round(by["cublas-fp16"] / r["us"], 3)
    return rows


def kernel_bench(shapes: str = "llama3-8b", ms=DEFAULT_M, runs: int = 50, warmup: int = 10, scheme: str = "is-w4a8",
                 progress=None) -> dict:
    """All kernel rows for the shape set ``shapes`` ("llama3-8b", "smollm2-135m" or "all")."""
    if scheme not in KERNEL_SCHEMES:
        raise QConvertError(f"--scheme {scheme}: no CUDA kernel for it in this release; kernels exist for {', '.join(KERNEL_SCHEMES)}")
    names = list(KERNEL_SHAPES) if shapes == "all" else [shapes]
    for s in names:
        if s not in KERNEL_SHAPES:
            raise QConvertError(f"--shapes {s}: unknown; choose from {', '.join(KERNEL_SHAPES)} or all")
    if runs < 50:
        raise QConvertError(f"--runs {runs}: a median needs at least 50 samples here")
    if not gpu_available():
        raise QConvertError(no_gpu_message("qconvert bench --kernels"))
    rows_of = kernel_rows
    if scheme == "zqfp-w4a8":
        from qconvert_kernels.fp8 import cuda as cuda_fp8

        if not cuda_fp8.available():
            raise QConvertError("qconvert bench --kernels --scheme zqfp-w4a8 needs FP8 tensor cores (compute capability "
                                "8.9 or newer: Ada, Hopper); this GPU has none: bench --scheme is-w4a8 instead")
        rows_of = zqfp_kernel_rows
    elif scheme == "quik-w4a4":
        rows_of = quik_kernel_rows
    elif scheme == "illm-w8a8":
        rows_of = illm_kernel_rows
    device = torch.device("cuda")
    rows = []
    for s in names:
        for label, n, k in KERNEL_SHAPES[s]:
            for m in ms:
                if progress:
                    progress(f"{s} {label} N={n} K={k} M={m}")
                rows += [dict(r, model=s) for r in rows_of(label, n, k, m, device, runs=runs, warmup=warmup)]
    return {"kind": "kernels", "scheme": scheme, "environment": environment(device), "runs": runs, "results": rows}


def kernel_summary(rows: list[dict], scheme: str = "is-w4a8") -> dict:
    """The ratios the targets are stated in, over the Llama-3-8B rows (min over shapes)."""
    main = {"is-w4a8": "w4a8-is", "zqfp-w4a8": "fp4-fp8", "quik-w4a4": "quik-w4a4", "illm-w8a8": "illm-w8a8"}[scheme]

    def worst(key, pred, best=False):
        vals = [r[key] for r in rows if r["kernel"] == main and r.get("model") == "llama3-8b" and pred(r["M"])]
        return (max(vals) if best else min(vals)) if vals else None

    if scheme != "is-w4a8":
        return {f"{main}_vs_cublas_min_M_le_16": worst("vs_cublas", lambda m: m <= 16),
                f"{main}_vs_cublas_min_M_ge_1024": worst("vs_cublas", lambda m: m >= 1024),
                f"{main}_vs_cublas_max": worst("vs_cublas", lambda m: True, best=True)}
    return {
        "is_vs_cublas_min_M_le_16": worst("vs_cublas", lambda m: m <= 16),
        "is_vs_cublas_min_M_ge_1024": worst("vs_cublas", lambda m: m >= 1024),
        "is_vs_fs_min_M_ge_256": worst("is_vs_fs", lambda m: m >= 256),
    }


# ---------------------------------------------------------------------------------------------
# end to end


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Budget:
    """A wall-clock bound on a whole bench run (``--budget-s``): once half of it is spent the
    remaining measurements take one repeat and at most 32 new tokens; once it is spent they are
    skipped, and the result says so."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.perf_counter() + seconds
        self.total = seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def short(self) -> bool:
        return self.deadline is not None and self.left() < self.total / 2

    def spent(self) -> bool:
        return self.left() <= 0


def _engine(model, max_batch: int, max_len: int, graphs: bool):
    """The model's own engine (``model.decode_engine``), else qconvert/engine.py's."""
    from qconvert.engine import DecodeEngine

    own = getattr(model, "decode_engine", None)
    if own is None:
        return DecodeEngine(model, max_batch=max_batch, max_len=max_len, graphs=graphs)
    return own(max_batch, max_len, graphs=graphs)


@torch.inference_mode()
def model_speed(model, device: torch.device, prefill: int = 2048, new_tokens: int = 128, batches=(1, 16, 64),
                prompt: int = 32, repeats: int = 3, seed: int = 0, graphs: bool = False, budget: Budget | None = None) -> dict:
    """Prefill and greedy-decode tokens/s of ``model`` (already on ``device``) on the decode engine
    (qconvert/engine.py): a static KV cache and, with ``graphs``, one CUDA graph per decode step.
    A model with its own engine (``model.decode_engine``: I-LLM's integer-only model, its rows as
    one batch, with ``graphs`` its decode step captured too) runs on that."""
    budget = budget or Budget(None)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    mode = "cuda-graph" if graphs else "eager"
    out = {"mode": mode, "prefill_tokens": prefill, "decode": [], "skipped": []}
    pre = _engine(model, 1, prefill + 1, graphs=False)  # prefill is eager in both modes
    ids = torch.randint(0, vocab, (1, prefill), generator=gen).to(device)
    pre.prefill(ids[:, : min(prefill, 16)])  # warm-up: kernel modules, allocator
    reps = 1 if budget.short() else repeats
    out["prefill_tokens_per_s"] = round(prefill / _median_seconds(lambda: pre.prefill(ids), device, reps), 2)
    del pre
    steps = new_tokens
    eng = _engine(model, max(batches), prompt + steps + 1, graphs)
    for b in batches:
        if budget.spent():
            out["skipped"].append({"batch": b, "why": "--budget-s spent"})
            continue
        start = torch.randint(0, vocab, (b, prompt), generator=gen).to(device)
        n = min(steps, 32) if budget.short() else steps

        def decode():
            nxt = eng.prefill(start).argmax(-1)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                nxt = eng.decode(nxt).argmax(-1)
            _sync(device)
            return time.perf_counter() - t0

        decode()  # warm-up at this batch size (captures its graph)
        t = statistics.median(decode() for _ in range(1 if budget.short() else repeats))
        out["decode"].append({"batch": b, "new_tokens": n, "tokens_per_s": round(b * n / t, 2),
                              "ms_per_step": round(1000 * t / n, 3)})
    del eng
    return out


def compute_dtype(device: torch.device) -> torch.dtype:
    """What bench, eval and generate compute in on ``device``: float16 on CUDA (the kernels' input),
    float32 on the CPU (the exact reference)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_device(device: str | None, command: str = "qconvert bench OUT") -> torch.device:
    """``--device`` of ``command``: None is cuda where usable, else cpu.  A GPU asked for where none is
    usable is refused with the CPU run of the same command as the fix."""
    if device is None:
        return torch.device("cuda" if gpu_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise QConvertError(f"--device {device}: use cpu or cuda")
    if dev.type == "cuda" and not gpu_available():
        raise QConvertError(no_gpu_message(f"--device {device}", command))
    return dev


def _runtime_label(device: torch.device) -> str:
    return "cuda-kernels" if device.type == "cuda" else "cpu-reference"


def _compare(fp: dict, q: dict) -> dict:
    ratio = {"prefill": round(q["prefill_tokens_per_s"] / fp["prefill_tokens_per_s"], 3)}
    for a, b in zip(fp["decode"], q["decode"]):
        ratio[f"decode_batch{a['batch']}"] = round(b["tokens_per_s"] / a["tokens_per_s"], 3)
    return ratio


def _modes(dev: torch.device) -> list[bool]:
    """graphs on / off: on CUDA both (the graph-captured one is the headline), on CPU eager only."""
    return [True, False] if dev.type == "cuda" else [False]


def _speeds(model, dev, kw: dict, budget: Budget, norms: bool = True, rope: bool = True, swiglu: bool = True) -> dict:
    """{"cuda-graph": ..., "eager": ...} (what ``_modes`` allows) of one model.  On a GPU, with
    ``norms``, the original and the quantized model both run their RMSNorms on the norm kernel,
    and with ``rope`` their RoPE on the rope kernel (``load`` sets them for an OUT; the original
    gets them here), so the speed-up is the quantization's, not the glue's."""
    if dev.type == "cuda":
        from qconvert.runtime import GLUE, use_glue_kernels

        use_glue_kernels(model, dev, [g for g, on in zip(GLUE, (norms, rope, swiglu)) if on])
    return {("cuda-graph" if g else "eager"): model_speed(model, dev, graphs=g, budget=budget, **kw)
            for g in _modes(dev)}


def _integer_only(result: dict, dev: torch.device, what: str = "OUT") -> dict:
    """Label a result whose quantized side is an integer-only model (on its own engine)."""
    result["runtime"] = f"integer-only-{dev.type}"
    result["note"] = (f"integer-only {what}: its integer model (integer norms, softmax, RoPE and SiLU, int8 KV cache) "
                      + ("with the I-LLM kernels and torch integer ops, decode steps graph-captured as the original's "
                         "(eager in the eager mode)" if dev.type == "cuda" else "in torch integer ops, eagerly")
                      + ", on its own engine")
    return result


def _result(target: str, original: str, dev, dtype, fp: dict, q: dict, budget: Budget, norms: bool = True,
            rope: bool = True, swiglu: bool = True) -> dict:
    """The result record: the headline (graph-captured on CUDA) in ``quantized`` / ``original_speed``
    / ``speedup``, every mode under ``modes``."""
    from qconvert.engine import cache_kernel_usable

    head = "cuda-graph" if "cuda-graph" in q else "eager"
    return {"kind": "model", "target": target, "original": original, "runtime": _runtime_label(dev),
            "dtype": str(dtype).removeprefix("torch."), "environment": environment(dev), "budget_s": budget.total,
            # on a GPU both models' RMSNorms, RoPE and SwiGLU run their kernels (``_speeds``) unless
            # --no-norm-kernels / --no-rope-kernels / --no-swiglu-kernels; the engine writes both models'
            # KV caches on the kvcache kernel where the GPU has the kernels (DecodeEngine's default)
            "norm_kernels": norms and dev.type == "cuda", "rope_kernels": rope and dev.type == "cuda",
            "swiglu_kernels": swiglu and dev.type == "cuda", "cache_kernel": dev.type == "cuda" and cache_kernel_usable(dev),
            "quantized": q[head], "original_speed": fp[head], "speedup": _compare(fp[head], q[head]),
            "modes": {m: {"quantized": q[m], "original_speed": fp[m], "speedup": _compare(fp[m], q[m])} for m in q}}


def out_bench(out: Path, device: str | None = None, prefill: int = 2048, new_tokens: int = 128, batches=(1, 16, 64),
              repeats: int = 3, against: str | None = None, budget_s: float | None = None, fuse: bool = True,
              norm_kernels: bool = True, rope_kernels: bool = True, swiglu_kernels: bool = True) -> dict:
    """Quantized OUT against its float original, on one device, one after the other."""
    from qconvert.formats.native import read_quant_config
    from qconvert.layouts import get_layout
    from qconvert.runtime import load
    from qconvert.source import resolve_source

    out = Path(out)
    _cfg, qc = read_quant_config(out)
    # a layout with a whole-model runtime (I-LLM's integer-only model) is no transformers model, which the engine needs
    integer_only = any(get_layout(name).model_runtime is not None for name in set(qc["modules"].values()))
    dev = resolve_device(device)
    dtype = compute_dtype(dev)
    if against is None:
        from qconvert.verify import recorded_source

        against = recorded_source(out)
        if against is None:
            raise QConvertError(f"{out}/qconvert.json does not name the source; pass --against SOURCE")
    budget = Budget(budget_s)
    kw = dict(prefill=prefill, new_tokens=new_tokens, batches=batches, repeats=repeats)
    glue = (norm_kernels, rope_kernels, swiglu_kernels)
    model = load(out, device=str(dev), dtype=dtype, fuse=fuse, norm_kernels=norm_kernels, rope_kernels=rope_kernels,
                 swiglu_kernels=swiglu_kernels)
    q = _speeds(model, dev, kw, budget, *glue)  # an integer-only model: on its own engine
    src = resolve_source(against)
    fp = _speeds(src.load_model(dtype).to(dev).eval(), dev, kw, budget, *glue)
    result = _result(str(out), getattr(src, "description", str(against)), dev, dtype, fp, q, budget, *glue)
    result["fused_groups"] = fused_groups(model)
    return _integer_only(result, dev) if integer_only else result


def synthetic_models(name: str, device: torch.device, layers: int | None = None, dtype=torch.float16, seed: int = 0):
    """(float model, a function that turns it into its W4A8-IS twin in place) of random weights."""
    from transformers import LlamaConfig

    from qconvert.runtime import fuse_siblings, set_module
    from qconvert.skeleton import build_skeleton, target_linears

    if name not in SYNTHETIC:
        raise QConvertError(f"--synthetic {name}: unknown; choose from {', '.join(SYNTHETIC)}")
    kw = dict(SYNTHETIC[name])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    config = LlamaConfig(**kw)
    model = build_skeleton(config)
    _check_fits(name, sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        # parameters are on meta; rotary tables are real buffers and must keep their values
        for mod in model.modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None and p.is_meta:
                    fresh = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
                    mod._parameters[pname] = torch.nn.Parameter(fresh, requires_grad=False)
        model.to(device)
        for n, mod in model.named_modules():
            if "norm" in n.rsplit(".", 1)[-1] and hasattr(mod, "weight"):
                mod.weight.fill_(1.0)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.eval()

    def quantize_in_place(scheme: str = "is-w4a8", fuse: bool = True):
        """Every decoder linear -> the runtime module of its layout under ``scheme``'s choices
        (SYNTHETIC_SCHEMES), with the layout's random tensors.  A layout with a whole-model runtime
        (I-LLM) returns that model, made from these linears and the float model's other weights."""
        from qconvert.layouts import get_layout

        linears = {}
        for lname, lin in target_linears(model, ["lm_head"]).items():
            n, k = lin.weight.shape
            layout_name, params = SYNTHETIC_SCHEMES[scheme](lname)
            layout = get_layout(layout_name)
            tensors = layout.random_tensors(n, k, gen, device, **params)
            whole = layout.model_runtime  # (built where its model runs, without a trip to the host)
            linears[lname] = layout.module(tensors if whole is not None else {key: v.cpu() for key, v in tensors.items()},
                                           None, **params)
        if whole is not None:
            state = {key: v for key, v in model.state_dict().items() if not key.endswith("_proj.weight")}
            return whole(None, config, linears, state, device)
        for lname, module in linears.items():
            set_module(model, lname, module.to(device))
        if device.type == "cuda" and fuse:
            fuse_siblings(model)  # as runtime.load runs a real OUT there
        return model

    return model, quantize_in_place


def _check_fits(name: str, nbytes: int, device: torch.device) -> None:
    """Refuse a synthetic model that cannot fit the device's free memory (it would be killed)."""
    from qconvert.placement import available_ram

    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_ram()
    if 2 * nbytes > free:  # the float model, then its quantized twin beside the float embeddings
        raise QConvertError(f"--synthetic {name}: its weights take {nbytes / 1e9:.1f} GB and {device.type} has "
                            f"{free / 1e9:.1f} GB free; pass --layers N for fewer decoder layers, or run it on a GPU")


# scheme -> (layer name -> (layout, its parameters)): the random-weight twins of --synthetic
SYNTHETIC_SCHEMES = {
    "is-w4a8": lambda name: ("w4a8-is", {"group_size": 128}),
    # QUIK's preset: "auto" outliers, down_proj in W8A8
    "quik-w4a4": lambda name: ("quik-w8a8" if name.endswith("down_proj") else "quik-w4a4", {"outliers": None}),
    # I-LLM's integer-only model (the runtime of every illm-* OUT), int8 weights
    "illm-w8a8": lambda name: ("illm-w8a8", {}),
}


def synthetic_bench(name: str, device: str | None = None, layers: int | None = None, prefill: int = 2048,
                    new_tokens: int = 128, batches=(1, 16, 64), repeats: int = 3, scheme: str = "is-w4a8",
                    budget_s: float | None = None, fuse: bool = True, norm_kernels: bool = True,
                    rope_kernels: bool = True, swiglu_kernels: bool = True) -> dict:
    if scheme not in SYNTHETIC_SCHEMES:
        raise QConvertError(f"--synthetic --scheme {scheme}: random-weight twins exist for {', '.join(SYNTHETIC_SCHEMES)}")
    dev = resolve_device(device, f"qconvert bench --synthetic {name}")
    dtype = compute_dtype(dev)
    budget = Budget(budget_s)
    kw = dict(prefill=prefill, new_tokens=new_tokens, batches=batches, repeats=repeats)
    fp_model, to_quantized = synthetic_models(name, dev, layers, dtype)
    glue = (norm_kernels, rope_kernels, swiglu_kernels)
    fp = _speeds(fp_model, dev, kw, budget, *glue)
    q_model = to_quantized(scheme=scheme, fuse=fuse)
    integer_only = hasattr(q_model, "decode_engine")
    if integer_only:  # its own copies of the weights: the float model is no longer needed
        del fp_model, to_quantized
        gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    q = _speeds(q_model, dev, kw, budget, *glue)
    result = _result(f"synthetic:{name} {scheme}" + (f" ({layers} layers)" if layers else ""),
                     f"synthetic:{name} (random {str(dtype).removeprefix('torch.')} weights)", dev, dtype, fp, q, budget,
                     *glue)
    result["fused_groups"] = fused_groups(q_model)
    return _integer_only(result, dev, "twin") if integer_only else result


def fused_groups(model) -> int:
    """How many groups of sibling linears run as one GEMM (``runtime.fuse_siblings``; 0 on CPU)."""
    return len({id(g) for m in model.modules() if (g := getattr(m, "_group", None)) is not None})


# ---------------------------------------------------------------------------------------------
# output


def kernel_table(result: dict):
    from rich.table import Table

    env = result["environment"]
    t = Table(title=f"{result.get('scheme', 'is-w4a8')} kernels vs cuBLAS FP16 — {env.get('device')} ({env.get('date')}, commit {env.get('commit')})")
    for col in ("model", "shape", "N x K", "M", "kernel", "µs", "TOPS", "GB/s", "vs cuBLAS", "vs cuBLAS (+quant)", "IS / FS",
                "roofline", "timing"):
        t.add_column(col, justify="left" if col in ("model", "shape", "kernel", "timing") else "right")

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    for r in result["results"]:
        t.add_row(r.get("model", ""), r["shape"], f"{r['N']}x{r['K']}", str(r["M"]), r["kernel"], f"{r['us']:.1f}",
                  f"{r['tops']:.1f}", f"{r['gbps']:.0f}", f(r.get("vs_cublas")), f(r.get("vs_cublas_with_quant")),
                  f(r.get("is_vs_fs")), "-" if r.get("roofline_frac") is None else f"{100 * r['roofline_frac']:.0f}%", r["timing"])
    return t


def model_table(result: dict):
    """Prefill and decode tokens/s, original against quantized, one section per mode (the
    graph-captured headline first on CUDA)."""
    from rich.table import Table

    env = result["environment"]
    t = Table(title=f"{result['target']} vs {result['original']} — {result['runtime']} on {env.get('device')} ({env.get('date')})")
    for col in ("mode", "measure", "original", "quantized", "speed-up"):
        t.add_column(col, justify="left" if col in ("mode", "measure") else "right")
    modes = result.get("modes") or {result["quantized"].get("mode", "eager"): result}
    for mode, r in modes.items():
        fp, q, s = r["original_speed"], r["quantized"], r["speedup"]
        t.add_row(mode, f"prefill 1 x {fp['prefill_tokens']} (tokens/s)", f"{fp['prefill_tokens_per_s']:,.1f}",
                  f"{q['prefill_tokens_per_s']:,.1f}", f"{s['prefill']:.2f}x")
        for a, b in zip(fp["decode"], q["decode"]):
            t.add_row(mode, f"decode {a['new_tokens']} tokens, batch {a['batch']} (tokens/s)", f"{a['tokens_per_s']:,.1f}",
                      f"{b['tokens_per_s']:,.1f}", f"{s['decode_batch' + str(a['batch'])]:.2f}x")
        for skipped in q.get("skipped", []):
            t.add_row(mode, f"decode batch {skipped['batch']}", "-", "-", skipped["why"])
        t.add_section()
    caption = [result["note"]] if result.get("note") else []
    if result.get("fused_groups"):
        caption.append(f"{result['fused_groups']} groups of sibling linears (q/k/v, gate/up) run as one GEMM each "
                       "(--no-fuse: one per linear)")
    if caption:
        t.caption = "; ".join(caption)
    return t


def plot_model(result: dict, path: Path) -> Path:
    """PNG: tokens/s of the original and the quantized model, per measure and mode."""
    plt = _pyplot()
    modes = result.get("modes") or {"eager": result}
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 3.6), squeeze=False)
    for ax, (mode, r) in zip(axes.flat, modes.items()):
        labels = ["prefill"] + [f"decode b{d['batch']}" for d in r["quantized"]["decode"]]
        fp = [r["original_speed"]["prefill_tokens_per_s"]] + [d["tokens_per_s"] for d in r["original_speed"]["decode"]]
        q = [r["quantized"]["prefill_tokens_per_s"]] + [d["tokens_per_s"] for d in r["quantized"]["decode"]]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], fp, width=0.4, label="original")
        ax.bar([x + 0.2 for x in xs], q, width=0.4, label="quantized")
        ax.set_xticks(list(xs), labels)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s")
        ax.set_title(mode, fontsize=9)
        ax.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"{result['target']} — {env.get('device')}, {env.get('date')}, commit {env.get('commit')}", fontsize=9)
    return _save(fig, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QConvertError("--plot needs matplotlib: pip install 'qconvert[plot]'") from None
    return plt


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kernels(result: dict, path: Path) -> Path:
    """PNG: speed-up of W4A8-IS and W4A8-FS over cuBLAS FP16 against M, one panel per shape."""
    plt = _pyplot()
    rows = result["results"]
    panels = list(dict.fromkeys((r.get("model", ""), r["shape"], r["N"], r["K"]) for r in rows))
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, (model, shape, n, k) in zip(axes.flat, panels):
        for kernel in ("w4a8-is", "w4a8-fs", "fp4-fp8", "fp8-fp8", "fp8-fp8-scaled", "quik-w4a4", "quik-w8a8", "illm-w8a8"):
            pts = sorted((r["M"], r["vs_cublas"]) for r in rows
                         if r["kernel"] == kernel and (r.get("model", ""), r["shape"], r["N"], r["K"]) == (model, shape, n, k))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kernel)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {shape} {n}x{k}", fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speed-up over cuBLAS FP16")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    env = result["environment"]
    fig.suptitle(f"{env.get('device')}, {env.get('date')}, commit {env.get('commit')}", fontsize=9)
    return _save(fig, path)


def save_json(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def save_result(out: Path, result: dict) -> Path:
    """Keep an end-to-end result in OUT/bench.json for the model card: one entry per
    (runtime, device, prefill, new tokens), the newest replacing an older one."""
    path = Path(out) / "bench.json"
    try:
        saved = json.loads(path.read_text()) if path.is_file() else []
        if not isinstance(saved, list):
            saved = []
    except json.JSONDecodeError:
        saved = []

    def key(r):
        q = r.get("quantized", {})
        return (r.get("runtime"), r.get("environment", {}).get("device"), q.get("prefill_tokens"),
                tuple(d.get("new_tokens") for d in q.get("decode", [])))

    def float_view(r):  # an integer-only OUT timed as its float view (qconvert bench before 2026-12-03)
        return str(r.get("note", "")).startswith("integer-only OUT: timed as the float model")

    replaced = str(result.get("runtime", "")).startswith("integer-only")
    saved = [r for r in saved if key(r) != key(result) and not (replaced and float_view(r))] + [result]
    return save_json(saved, path)
