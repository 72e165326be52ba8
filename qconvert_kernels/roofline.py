"""Roofline model of the W4A8 kernels and of cuBLAS FP16, and the design's predicted times.

Everything here is arithmetic on shapes and datasheet numbers: PREDICTIONS, not measurements.
``qconvert bench --kernels`` adds the roofline time and the fraction of it reached to its measured
rows (``roofline_for``); benchmarks/roofline.py prints the table and writes JSON.

Per linear (N output channels, K input channels, M tokens, group size g):

  ops        2 M N K
  bytes      the fewest a kernel must move through HBM: each operand read once, y written once
             FP16   2MK (x) + 2NK (W) + 2MN (y)
             W4A8   2MK (x, fp16, read by the fused quantizer) + NK/2 (W) + N G s (scales: s = 2 for
                    int16 integer scales or fp16 float scales) + 4N (IS channel scale) + 2MN (y)
  roofline   max(bytes / HBM bandwidth, ops / tensor-core peak)  (int8 peak for W4A8, bf16 for FP16)

The design's predicted time (``predict``) adds what the design itself costs on top of the roofline,
each term an assumption stated in ``Device`` and docs/kernels.md:

  decode  (M <= 64, one launch)   fixed  + max(HBM at an achieved fraction, L2 traffic, tensor work)
          L2 traffic: each n tile re-reads x (fp16) and split-K partials are written and read back;
          tensor work: M padded to the 8-token mma tile, at the mma.sync int8 rate.
  prefill (M > 64, two launches)  quantizer + fixed + max(HBM, tensor work, per-SM unit work)
          per-SM unit work: the group fold (IS: 2 int32 ops / accumulator / group; FS: an int->float
          conversion at the conversion units' quarter rate plus 2 float ops) against the mma.
  cuBLAS FP16                     fixed + max(HBM at its achieved fraction, bf16 tensor work)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Llama-3-8B linears (N, K): the separate projections and the fused ones runtimes use.
LLAMA3_8B = {
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
    "qkv_proj": (6144, 4096), "gate_up_proj": (28672, 4096),
}
MS = (1, 4, 16, 64, 256, 1024, 4096)
# one decoder block's linears: one GEMM each, or q/k/v and gate/up joined (qconvert.runtime.fuse_siblings)
BLOCK_UNFUSED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK_FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Device:
    """Datasheet ceilings and the model's assumptions for one GPU (all leads until measured)."""

    name: str
    sms: int
    hbm_tbps: float          # HBM bandwidth, TB/s (datasheet)
    bf16_tflops: float       # dense bf16 / fp16 tensor peak (datasheet)
    int8_tops: float         # dense int8 tensor peak (datasheet; reached through wgmma)
    l2_tbps: float = 6.0     # L2 -> SM bandwidth (assumption: measured H100 figures are 5.5-7 TB/s)
    clock_ghz: float = 1.755  # SM clock under load (assumption)
    imma_sync_frac: float = 0.5   # share of the int8 peak mma.sync (the kernels' IMMA) reaches (assumption)
    hbm_frac: float = 0.85        # HBM bandwidth a streaming kernel reaches (assumption; METHOD.md: measure)
    cublas_hbm_frac: float = 0.85  # what cuBLAS's GEMV-like small-M kernels reach (assumption)
    cublas_tc_frac: float = 0.75   # what cuBLAS reaches of the bf16 peak at large M (assumption)
    launch_us: float = 1.5        # one kernel inside a CUDA graph: launch + first DRAM round trip (assumption)
    decode_sync_us: float = 1.0   # decode kernel: amax exchange + split-K tail (assumption)

    @property
    def int8_sync_tops(self) -> float:
        return self.int8_tops * self.imma_sync_frac


DEVICES = {
    "H200": Device("H200", 132, 4.8, 989.0, 1979.0),
    "H100": Device("H100 SXM", 132, 3.35, 989.0, 1979.0),
}


def device_for(name: str | None) -> Device | None:
    """The modelled device matching a torch device name ('NVIDIA H200', 'NVIDIA H100 80GB HBM3'), or None."""
    name = (name or "").upper()
    for key in ("H200", "H100"):
        if key in name:
            return DEVICES[key]
    return None


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def scale_bytes(layout: str) -> int:
    return 2  # IS: int16 when every integer scale fits (repack.iscale_dtype), FS: fp16


def traffic(n: int, k: int, m: int, g: int = 128, layout: str = "w4a8-is") -> dict:
    """The fewest HBM bytes and the ops of one linear, for FP16 and for the W4A8 layout."""
    kp = _ceil(k, g) * g
    w4 = n * kp // 2 + n * (kp // g) * scale_bytes(layout) + (4 * n if layout == "w4a8-is" else 0)
    return {
        "ops": 2 * m * n * k,
        "bytes_fp16": 2 * m * k + 2 * n * k + 2 * m * n,
        "bytes_w4a8": 2 * m * k + w4 + 2 * m * n,
    }


def roofline_us(n: int, k: int, m: int, dev: Device, kind: str = "w4a8", g: int = 128, layout: str = "w4a8-is") -> float:
    """max(bytes / HBM, ops / peak) in µs: the floor no kernel of that arithmetic beats."""
    t = traffic(n, k, m, g, layout)
    if kind == "fp16":
        return max(t["bytes_fp16"] / (dev.hbm_tbps * 1e6), t["ops"] / (dev.bf16_tflops * 1e6))
    return max(t["bytes_w4a8"] / (dev.hbm_tbps * 1e6), t["ops"] / (dev.int8_tops * 1e6))


def decode_splits(n: int, k: int, m: int, g: int, sms: int, one_wave: bool = True) -> int:
    """The W4A8 decode kernel's split-K count S for an N x K linear, M tokens, group size g, on
    ``sms`` SMs (torch-free: the launcher, qconvert_kernels/w4a8/cuda.py:plan, and this model both
    use it).  Every SM gets a CTA (at most one split per group), up to two CTAs per SM while the
    split-K partials (S x M x N x 4 bytes) stay under the weight bytes, and, when the tiles allow,
    no more CTAs than are resident at once (S x tiles <= 2 x SMs, rounded down: a CTA's life at
    decode is mostly latency, and a partial second wave would add a whole one).  ``one_wave=False``
    is the rule before 2026-12-04, which rounded up (benchmarks/decode_variants.py times both)."""
    kp = _ceil(k, g) * g
    tiles = _ceil(n, 128)
    s_two = max(1, 2 * sms // tiles) if one_wave else _ceil(2 * sms, tiles)
    s_fill = min(_ceil(sms, tiles), s_two)
    return max(1, min(kp // g, max(s_fill, min(s_two, max(1, kp // (16 * m))))))


def predict(n: int, k: int, m: int, dev: Device, layout: str = "w4a8-is", g: int = 128) -> dict:
    """The design's predicted time (µs) for one W4A8 linear, with its terms (see the module doc)."""
    t = traffic(n, k, m, g, layout)
    kp = _ceil(k, g) * g
    n128 = _ceil(n, 128) * 128
    hbm_w4 = t["bytes_w4a8"] / (dev.hbm_tbps * dev.hbm_frac * 1e6)
    if m <= 64:
        s = decode_splits(n, k, m, g, dev.sms)
        tiles = n128 // 128
        l2 = tiles * m * kp * 2 + (2 * s * m * n128 * 4 if s > 1 else 0) + n128 * kp // 2
        m_pad = 8 * {1: 1, 2: 2, 3: 4, 4: 4}.get(_ceil(m, 8), 8)
        mma = 2 * m_pad * n128 * kp / (dev.int8_sync_tops * 1e6)
        terms = {"hbm": hbm_w4, "l2": l2 / (dev.l2_tbps * 1e6), "mma": mma}
        total = dev.launch_us + dev.decode_sync_us + max(terms.values())
        return {"kernel": "decode", "splits": s, "us": total, **{f"{k_}_us": v for k_, v in terms.items()}}
    # prefill: quantizer launch (x read, xq written) + the GEMM
    quant = dev.launch_us + (2 * m * k + m * kp + 4 * m) / (dev.hbm_tbps * dev.hbm_frac * 1e6)
    m_pad = _ceil(m, 128) * 128
    mma_ops = 2 * m_pad * n128 * kp
    mma = mma_ops / (dev.int8_sync_tops * 1e6)
    # per-SM unit work of the fold: accumulators per group = M_pad N128 (one per output), per group
    folds = m_pad * n128 * (kp // g)
    clk = dev.clock_ghz * 1e3  # cycles per µs
    if layout == "w4a8-is":
        fold = folds * 2 / (64 * dev.sms * clk)           # SHF + IMAD, 64 / clk / SM each
    else:
        fold = folds / (16 * dev.sms * clk) + folds * 2 / (128 * dev.sms * clk)  # I2F at 16 / clk; FMUL, FADD at 128
    terms = {"hbm": hbm_w4, "mma": mma, "fold": fold}
    total = quant + dev.launch_us + max(terms.values())
    return {"kernel": "prefill", "splits": 1, "us": total, "quant_us": quant, **{f"{k_}_us": v for k_, v in terms.items()}}


def predict_cublas(n: int, k: int, m: int, dev: Device) -> float:
    """Predicted cuBLAS FP16 time (µs): a GEMV-like kernel at small M, a tensor-core GEMM at large M."""
    t = traffic(n, k, m)
    return dev.launch_us + max(t["bytes_fp16"] / (dev.hbm_tbps * dev.cublas_hbm_frac * 1e6),
                               t["ops"] / (dev.bf16_tflops * dev.cublas_tc_frac * 1e6))


def table(devices=("H200", "H100"), shapes=None, ms=MS, g: int = 128) -> list[dict]:
    """One row per (device, shape, M): bytes, ops, rooflines, predicted times and speed-ups."""
    rows = []
    for dname in devices:
        dev = DEVICES[dname]
        for shape, (n, k) in (shapes or LLAMA3_8B).items():
            for m in ms:
                t = traffic(n, k, m, g)
                is_ = predict(n, k, m, dev, "w4a8-is", g)
                fs = predict(n, k, m, dev, "w4a8-fs", g)
                cub = predict_cublas(n, k, m, dev)
                roof_w4 = roofline_us(n, k, m, dev, "w4a8", g)
                rows.append({
                    "device": dev.name, "shape": shape, "N": n, "K": k, "M": m, "ops": t["ops"],
                    "bytes_fp16": t["bytes_fp16"], "bytes_w4a8": t["bytes_w4a8"],
                    "roofline_fp16_us": round(roofline_us(n, k, m, dev, "fp16"), 3),
                    "roofline_w4a8_us": round(roof_w4, 3),
                    "bound": "memory" if t["bytes_w4a8"] / dev.hbm_tbps > t["ops"] / dev.int8_tops else "compute",
                    "kernel": is_["kernel"], "splits": is_["splits"],
                    "pred_is_us": round(is_["us"], 3), "pred_fs_us": round(fs["us"], 3), "pred_cublas_us": round(cub, 3),
                    "pred_is_vs_cublas": round(cub / is_["us"], 2), "pred_is_vs_fs": round(fs["us"] / is_["us"], 2),
                    "pred_is_roofline_frac": round(roof_w4 / is_["us"], 2),
                })
    return rows


def block_table(rows: list[dict]) -> list[dict]:
    """Per (device, M) of ``table``'s rows: the predicted W4A8-IS time of one Llama-3-8B decoder
    block's seven linears, one GEMM each and with q/k/v and gate/up joined, and cuBLAS FP16's
    (one GEMM each, as transformers runs the float model)."""
    by = {(r["device"], r["shape"], r["M"]): r for r in rows}
    out = []
    for dev, m in dict.fromkeys((r["device"], r["M"]) for r in rows):
        if not all((dev, s, m) in by for s in BLOCK_UNFUSED + BLOCK_FUSED):
            continue
        unfused = sum(by[(dev, s, m)]["pred_is_us"] for s in BLOCK_UNFUSED)
        fused = sum(by[(dev, s, m)]["pred_is_us"] for s in BLOCK_FUSED)
        cublas = sum(by[(dev, s, m)]["pred_cublas_us"] for s in BLOCK_UNFUSED)
        out.append({"device": dev, "M": m, "pred_is_unfused_us": round(unfused, 2), "pred_is_fused_us": round(fused, 2),
                    "pred_cublas_us": round(cublas, 2), "pred_fused_vs_unfused": round(unfused / fused, 2),
                    "pred_unfused_vs_cublas": round(cublas / unfused, 2), "pred_fused_vs_cublas": round(cublas / fused, 2)})
    return out


def format_block_table(rows: list[dict]) -> str:
    head = (f"{'device':9s} {'M':>5s} {'IS 7 GEMMs us':>13s} {'IS fused us':>11s} {'cuBLAS us':>9s} {'fused gain':>10s} "
            f"{'7/cuBLAS':>8s} {'fused/cuBLAS':>12s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['device']:9s} {r['M']:5d} {r['pred_is_unfused_us']:13.2f} {r['pred_is_fused_us']:11.2f} "
                     f"{r['pred_cublas_us']:9.2f} {r['pred_fused_vs_unfused']:9.2f}x {r['pred_unfused_vs_cublas']:7.2f}x "
                     f"{r['pred_fused_vs_cublas']:11.2f}x")
    return "\n".join(lines)


def roofline_for(device_name: str | None, n: int, k: int, m: int, kernel: str, g: int = 128) -> dict | None:
    """For a measured ``qconvert bench --kernels`` row: the roofline time of its arithmetic on the
    modelled device (None if the device is not modelled)."""
    dev = device_for(device_name)
    if dev is None:
        return None
    kind = "fp16" if kernel.startswith("cublas") else "w4a8"
    layout = "w4a8-fs" if kernel == "w4a8-fs" else "w4a8-is"
    return {"roofline_us": round(roofline_us(n, k, m, dev, kind, g, layout), 3), "roofline_device": dev.name}


def assumptions() -> dict:
    return {name: asdict(d) for name, d in DEVICES.items()}


def format_table(rows: list[dict]) -> str:
    head = f"{'device':9s} {'shape':13s} {'N x K':>12s} {'M':>5s} {'bound':>7s} {'roof W4':>8s} {'roof FP16':>9s} " \
           f"{'IS us':>8s} {'FS us':>8s} {'cuBLAS us':>9s} {'IS/cuBLAS':>9s} {'IS/FS':>6s} {'IS roof%':>8s}  kernel"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['device']:9s} {r['shape']:13s} {str(r['N']) + 'x' + str(r['K']):>12s} {r['M']:5d} {r['bound']:>7s} "
                     f"{r['roofline_w4a8_us']:8.2f} {r['roofline_fp16_us']:9.2f} {r['pred_is_us']:8.2f} {r['pred_fs_us']:8.2f} "
                     f"{r['pred_cublas_us']:9.2f} {r['pred_is_vs_cublas']:9.2f} {r['pred_is_vs_fs']:6.2f} "
                     f"{100 * r['pred_is_roofline_frac']:7.0f}%  {r['kernel']}{'/S=' + str(r['splits']) if r['kernel'] == 'decode' else ''}")
    return "\n".join(lines)


def math_check() -> None:  # pragma: no cover - a guard for edits
    assert math.isclose(roofline_us(4096, 4096, 1, DEVICES["H200"]), (2 * 4096 + 4096 * 4096 // 2 + 4096 * 32 * 2 + 4 * 4096 + 2 * 4096) / 4.8e6)
