"""QUIK's 4-bit layers on the repacked W4A8 kernels (the "s8r" path, sm_90's default):
``w4a8r_decode_quik_m*`` (M <= 64) and ``w4a8r_prefill_quik`` in w4a8/w4a8_repacked.cu, their
weights repacked once (``quik/cuda.py:prepare_repacked``), launched through the real launcher with
the split kernel on quik/emulate.py's emulator and the GEMMs on w4a8/emulate.py's (every lane's
registers, the cp.async stages through shared memory with the kernel's own index math, the mma
fragments per the PTX ISA, split-K's tickets), and compared bit for bit with the torch reference
(quik/reference.py) on odd shapes.  Mutations show the emulator can fail.
tests/test_kernels_quik_gpu.py runs the same path on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_mutation_caught
from test_kernels_quik_emulate import quik_case

from qconvert.formats.packing import pack_int4
from qconvert_kernels.quik import cuda as cuda_quik
from qconvert_kernels.quik import emulate
from qconvert_kernels.quik import reference as refq


def run_repacked(m, n, k, n_out, dtype, clip=1.0, sm_count=8, mutations=frozenset()):
    """quik_linear on the "s8r" path under both emulators; its y (and the int32 sum) against the
    reference fed the same outlier product.  Returns the W4A8 emulator (its launches)."""
    x, base_idx, outlier_idx, q, wscale, wsum, w_out = quik_case(m, n, k, n_out, 4, dtype, seed=7 * m + n + k)
    prepared = cuda_quik.prepare_repacked(pack_int4(q), wscale, wsum, "cpu")
    with emulate.emulating_repacked(sm_count=sm_count, w4_mutations=mutations) as (_, w4):
        y = cuda_quik.quik_linear(x, base_idx, outlier_idx, pack_int4(q), wscale, wsum, w_out, 4, path="s8r",
                                  clip=clip, prepared=prepared)
        xq, s, z, x_out = cuda_quik.split_quantize(x, base_idx, outlier_idx, 4, False, clip, width=prepared.kq)
        y_out = torch.matmul(x_out, w_out.t()) if n_out else None
        y2, acc = cuda_quik.quik_gemm_repacked(xq, s, z, prepared, y_out, dtype, return_acc=True)
    rq, rs, rz, rx = refq.quantize_split(x, base_idx, outlier_idx, 4, clip)
    assert torch.equal(xq[:, :rq.shape[1]], rq) and not xq[:, rq.shape[1]:].any(), "split: xq differs"
    ry, racc = refq.quik_gemm(rq, rs, rz, q, wscale, wsum, y_out.float() if n_out else torch.zeros(m, n),
                              return_acc=True)
    assert torch.equal(acc, racc), f"int32 sum differs in {(acc != racc).sum()} places"
    want = ry.to(dtype).view(torch.int16)
    assert torch.equal(y2.view(torch.int16), want), f"y differs in {(y2.view(torch.int16) != want).sum()} places"
    assert torch.equal(y.view(torch.int16), want), "quik_linear differs from its own GEMM"
    return w4


# (M, N, K, outliers): decode (M <= 64: one token with split-K over the 8 emulated SMs, 3, 17 and
# 64 tokens, each decode width) and prefill (65, 130: one and two 128-token tiles); odd M and N,
# Kbp % 128 == 64 (the repack pads a group of zeros), no outliers (no outlier product to add)
REPACKED_CASES = [
    (1, 72, 200, 8),
    (3, 13, 576, 32),
    (17, 130, 300, 16),
    (64, 40, 256, 0),
    (65, 64, 128, 0),
    (130, 200, 1000, 96),
]


def kernel_for(m: int) -> str:
    return f"w4a8r_decode_quik_m{next(w for w in (8, 16, 32, 64) if w >= m)}" if m <= 64 else "w4a8r_prefill_quik"


@pytest.mark.parametrize("m,n,k,n_out", REPACKED_CASES)
def test_repacked_quik_bit_exact(m, n, k, n_out):
    w4 = run_repacked(m, n, k, n_out, torch.float16)
    assert [name for name, *_ in w4.launches] == [kernel_for(m)] * 2


@pytest.mark.parametrize("m", [3, 65])
def test_repacked_quik_bf16_clipped_and_split_k(m):
    """bfloat16 activations, a clip float32 cannot hold (1/3), and K (G = 5 groups) split on both
    kernels: a group per split on the decode kernel, 3 uneven ways on the prefill kernel (one
    128-token tile of 128 channels on 3 SMs)."""
    w4 = run_repacked(m, 13, 576, 32, torch.bfloat16, clip=1 / 3, sm_count=3)
    name, grid, _, vals = w4.launches[0]
    assert name == kernel_for(m) and vals["S"] > 1 and (m <= 64 or vals["gr"] > 0), (name, vals)


def test_repacked_weights_are_the_w4a8_integer_scale_layer():
    """prepare_repacked: Kq = Kbp rounded up to 128 with zero weights, iscale 1 in int16, cscale ws,
    zc = ws * R rounded once in float32; zero past N."""
    x, base_idx, outlier_idx, q, wscale, wsum, w_out = quik_case(3, 13, 576, 32, 4, torch.float16, seed=1)
    p = cuda_quik.prepare_repacked(pack_int4(q), wscale, wsum, "cpu")
    assert (p.kq, p.w4.group_size, p.w4.scale16, p.w4.alpha_log2) == (640, 128, True, 0)
    assert p.w4.scales.shape == (5, 128) and (p.w4.scales[:, :13] == 1).all() and not p.w4.scales[:, 13:].any()
    assert torch.equal(p.w4.cscale[:13], wscale) and not p.w4.cscale[13:].any()
    assert torch.equal(p.zc[:13], wscale * wsum.float()) and not p.zc[13:].any()


@pytest.mark.parametrize("m", [3, 130])
def test_the_emulator_catches_a_missing_zero_point_term(m):
    """The epilogue without z[m] * ws[n] * R[n] (the activations' zero point meeting the weights),
    on the decode and the prefill kernel."""
    assert_mutation_caught(run_repacked, (m, 200, 1000, 96, torch.float16), "quik_no_z", "differs",
                           emulate.EmulationError)


def test_the_emulator_catches_a_reordered_epilogue():
    """The outlier product added before the zero-point term: the same sum in another order, which
    float32 rounds differently on 2 of these 26,000 outputs once rounded to fp16 (64 tokens of the
    decode kernel showed none: the order is checked on the prefill's epilogue, which is the same code)."""
    assert_mutation_caught(run_repacked, (130, 200, 1000, 96, torch.float16), "quik_order", "differs",
                           emulate.EmulationError)


def test_a_bad_path_or_width_is_refused():
    x, base_idx, outlier_idx, q, wscale, wsum, w_out = quik_case(3, 13, 576, 32, 4, torch.float16, seed=1)
    with emulate.emulating_repacked(), pytest.raises(ValueError, match="path 's9' not one of"):
        cuda_quik.quik_linear(x, base_idx, outlier_idx, pack_int4(q), wscale, wsum, w_out, 4, path="s9")
    with emulate.emulating_repacked(), pytest.raises(ValueError, match="width 600 must be a multiple of 64"):
        cuda_quik.split_quantize(x, base_idx, outlier_idx, 4, False, width=600)


def test_the_layer_runs_its_repacked_copy():
    """A QuikLinear as the QUIK method makes it, prepared for the repacked kernel (on the CPU for
    the emulator: ``prepare_cuda("cpu")``), runs its forward on it, as the reference fed the same
    fp16 outlier product does; an 8-bit layer has nothing to repack and keeps its path."""
    from test_quik import _problem

    from qconvert.layouts.quik import QuikLinear
    from qconvert.methods.quik import QuikMethod

    w, h, x = _problem(n=72, k=200, rows=512, outliers=(5, 77, 190))
    for bits in (4, 8):
        meth = QuikMethod({"bits": bits, "outliers": 16, "base": "rtn", "act_clip": 0.9})
        ql = meth.quantize_linears(["m.layers.0.mlp.up_proj"], [w], h, input_amax=x.abs().amax(0))[0]
        lin = QuikLinear(ql.layout, ql.tensors, None, act_clip=0.9)
        lin.prepare_cuda("cpu")
        assert (lin._prepared is not None) == (bits == 4)
        if bits == 8:
            continue
        xs = x[:17].half()
        rq, rs, rz, rx = refq.quantize_split(xs, lin.base_idx, lin.outlier_idx, 4, 0.9)
        y_out = torch.matmul(rx, lin.outlier_weight.to(xs.dtype).t())
        want = refq.quik_gemm(rq, rs, rz, lin.weights_int8(), lin.wscale, lin.wsum, y_out.float()).half()
        with emulate.emulating_repacked() as (quik, w4):
            y = lin(xs)
        assert torch.equal(y.view(torch.int16), want.view(torch.int16))
        assert [n for n, *_ in quik.launches] == ["quik_split_wide_f16"] and [n for n, *_ in w4.launches] == [kernel_for(17)]


def test_the_prediction_script_reads_the_committed_h200_results():
    """benchmarks/quik_repacked_prediction.py (docs/kernels.md quotes it): a row per Llama-3-8B
    shape at M = 1 and 4096, each predicted GEMM below the first kernel's measured time."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "quik_repacked_prediction.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    first, second = out.strip().split("\n\n")
    rows = [line.split(" | ") for line in first.splitlines()[2:]]
    assert len(rows) == 8 and {r[1] for r in rows} == {"1", "4096"}
    assert all(float(r[4].split()[0]) < float(r[3]) for r in rows)
    # the decode layer with the outlier product in the split's launch: below the layer predicted without it
    assert all(float(r[7].split()[0]) < float(r[6].split()[0]) for r in rows if r[1] == "1")
    # W8A8 at M = 1: the GEMV predicted below the tile kernel measured, on the four shapes
    w8 = [line.split(" | ") for line in second.splitlines()[2:]]
    assert len(w8) == 4 and all(float(r[4].split()[0]) < float(r[3]) for r in w8)


def test_a_repacked_layer_keeps_its_packed_weights_on_the_host():
    """What ``load(OUT, device="cuda")`` does once a 4-bit layer is repacked: its stored ``qweight``
    (which the kernel no longer reads) stays in host memory through the module's moves, which take
    everything else, so a GPU holds the base weights once; the output does not change.  An
    unprepared layer holds nothing back."""
    from qconvert.layouts.quik import QuikLinear

    x, base_idx, outlier_idx, q, wscale, wsum, w_out = quik_case(5, 40, 300, 16, 4, torch.float16, seed=4)
    tensors = {"qweight": pack_int4(q), "shape": torch.tensor([40, 300]), "wscale": wscale, "wsum": wsum,
               "outlier_idx": outlier_idx.to(torch.int32), "outlier_weight": w_out}
    unprepared = QuikLinear("quik-w4a4", dict(tensors), None)
    unprepared.keep_stored_on_host()
    assert not unprepared._stored_on_host
    lin = QuikLinear("quik-w4a4", dict(tensors), None)
    lin.prepare_cuda("cpu")
    lin.keep_stored_on_host()
    packed = lin.qweight
    with emulate.emulating_repacked():
        before = lin(x)
        lin._apply(lambda t: t.clone())  # a move: every other tensor copied
        assert lin.qweight is packed and lin.wscale is not tensors["wscale"]
        assert torch.equal(lin(x), before)
    lin.to("meta")
    assert lin.wscale.is_meta and lin.qweight.device.type == "cpu"


@pytest.mark.parametrize("m", [3, 70])
def test_the_kernel_benchmark_runs_every_quik_kernel_it_times(monkeypatch, m):
    """``qconvert bench --kernels --scheme quik-w4a4`` (gpu_check part e) on an sm_90 path, its
    launches on the emulators and its timer replaced by one call per operand set: every row it
    writes comes from a kernel that ran (the new path, the first kernel beside it, W8A8, the split)."""
    from helpers import emulated_timer

    from qconvert import bench

    emulated_timer(monkeypatch)
    monkeypatch.setattr(cuda_quik, "int4_path", lambda device: "s8r")
    with emulate.emulating_repacked() as (quik, w4):
        rows = bench.quik_kernel_rows("probe", 40, 300, m, torch.device("cpu"), outliers=16)
    splits = ["quik-split", "quik-split-row" if m <= 64 else "quik-split-wide"] + (["quik-split-outliers"] if m <= 8 else [])
    assert [r["kernel"] for r in rows] == ["cublas-fp16", *splits, "quik-w4a4-gemm", "quik-w4a4-gemm-s8",
                                           "quik-w4a4", "quik-w8a8-gemm", "quik-w8a8-gemm-tile", "quik-w8a8"]
    assert {r["int4_path"] for r in rows} == {"s8r"}
    assert all("vs_cublas" in r for r in rows[1:] if not r["kernel"].startswith("quik-split"))
    assert {n for n, *_ in w4.launches} == {kernel_for(m)}
    assert {n for n, *_ in quik.launches} == {"quik_split_f16", "quik_split_wide_f16", "quik_gemm_w4a4_s8_f16",
                                              "quik_gemm_w8a8_f16",  # W8A8: the GEMV at M <= 8, else torch._int_mm
                                              "quik_gemv_w8a8_f16" if m <= 8 else "quik_epilogue_rows_f16"}
    fused = [a for n, _, a in quik.launches if n == "quik_split_wide_f16" and a["w_out"]]
    assert len(fused) == (3 * 2 if m <= 8 else 0)  # the timed row and both layers, per operand set


def test_the_kernel_benchmark_on_the_int4_tensor_core_path(monkeypatch):
    """The same on sm_80 .. sm_89's path (int4_path "s4") at decode: the 4-bit layer's GEMM is the
    W4A4 GEMV on unpacked codes, and the s4 tile kernel (packed codes) is timed beside it."""
    from helpers import emulated_timer

    from qconvert import bench

    emulated_timer(monkeypatch)
    monkeypatch.setattr(cuda_quik, "int4_path", lambda device: "s4")
    with emulate.emulating_repacked() as (quik, w4):
        rows = bench.quik_kernel_rows("probe", 40, 300, 3, torch.device("cpu"), outliers=16)
    assert [r["kernel"] for r in rows] == ["cublas-fp16", "quik-split", "quik-split-row", "quik-split-outliers",
                                           "quik-w4a4-gemm", "quik-w4a4-gemm-tile", "quik-w4a4", "quik-w8a8-gemm",
                                           "quik-w8a8-gemm-tile", "quik-w8a8"]
    assert {r["int4_path"] for r in rows} == {"s4"} and not w4.launches
    assert {n for n, *_ in quik.launches} == {"quik_split_f16", "quik_split_wide_f16", "quik_gemv_w4a4_f16",
                                              "quik_gemm_w4a4_s4_f16", "quik_gemv_w8a8_f16", "quik_gemm_w8a8_f16"}
