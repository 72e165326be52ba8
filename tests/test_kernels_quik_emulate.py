"""The QUIK kernels (quik_gemm.cu), DI-MatMul (illm_gemm.cu) and the native-layout W4A8 GEMMs
(w4a8_gemm.cu) proven on the CPU: the real launchers run with their launches routed to the
lane-exact emulator (quik/emulate.py), and the results must equal the torch references bit for
bit; the emulator checks every memory access, shared-memory race, stage and output write on the
way.  Mutation tests show that deliberate kernel bugs are caught.  No GPU needed (tests/test_kernels_quik_gpu.py and
tests/test_kernels_illm_gpu.py run the same kernels on one).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from helpers import assert_mutation_caught, macro_params

from qconvert.formats.packing import pack_int4, unpack_int4
from qconvert_kernels.illm import cuda as cuda_illm
from qconvert_kernels.illm import reference as ri
from qconvert_kernels.quik import cuda as cuda_quik
from qconvert_kernels.quik import emulate
from qconvert_kernels.quik import reference as refq
from qconvert_kernels.w4a8 import cuda as kcuda

MAINLOOP_W4 = (kcuda.SOURCE.parent / "w4a8_mainloop.cuh").read_text()
MAINLOOP_BYTES = (cuda_quik.SOURCE.parent / "quik_mainloop.cuh").read_text()


def quik_case(m, n, k, n_out, bits, dtype, seed):
    """Activations with outlier channels (an all-zero and a constant token), int weights, scales."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((m, k), generator=gen) * torch.rand((m, 1), generator=gen) * 3
    outlier_idx = torch.sort(torch.randperm(k, generator=gen)[:n_out]).values
    x[:, outlier_idx] *= 20
    if m > 2:
        x[1] = 0
        x[2, :] = 1.5
    x = x.to(dtype)
    base_idx = refq.split_columns(k, outlier_idx)
    kbp = refq.padded_base(k - n_out)
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (n, kbp), generator=gen, dtype=torch.int8)
    q[:, k - n_out:] = 0
    wscale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    w_out = (torch.randn((n, n_out), generator=gen) * 0.02).to(dtype)
    return x, base_idx, outlier_idx, q, wscale, q.to(torch.int32).sum(1, dtype=torch.int32), w_out


def run_quik(m, n, k, n_out, bits, path, dtype, clip=1.0, mutations=frozenset(), kernel=None, gemm_kernel=None):
    """Split (its activations clipped by ``clip``; ``kernel`` the split kernel, default the
    launcher's choice), outlier product and GEMM through the launchers on the emulator; checked
    against the reference bit for bit (xq, s, z, x_out, the int32 accumulator and y)."""
    x, base_idx, outlier_idx, q, wscale, wsum, w_out = quik_case(m, n, k, n_out, bits, dtype, seed=7 * m + n + k)
    pack = path == "s4"
    with emulate.emulating(mutations=mutations) as emu:
        xq, s, z, x_out = cuda_quik.split_quantize(x, base_idx, outlier_idx, bits, pack, clip, kernel=kernel)
        y_out = torch.matmul(x_out, w_out.t()) if n_out else None
        qw = pack_int4(q) if bits == 4 else q
        y, acc = cuda_quik.quik_gemm(xq, s, z, qw, wscale, wsum, y_out, bits, dtype, return_acc=True, kernel=gemm_kernel)
    rq, rs, rz, rx = refq.quantize_split(x, base_idx, outlier_idx, bits, clip)
    assert torch.equal(unpack_int4(xq) if pack else xq, rq), "split: xq differs"
    assert torch.equal(s, rs) and torch.equal(z, rz), "split: s or z differs"
    assert torch.equal(x_out, rx), "split: x_out differs"
    ry, racc = refq.quik_gemm(rq, rs, rz, q, wscale, wsum, y_out.float() if n_out else torch.zeros(m, n), return_acc=True)
    assert torch.equal(acc, racc), f"int32 accumulator differs in {(acc != racc).sum()} places"
    want = ry.to(dtype)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"y differs in {(y != want).sum()} places"
    return emu


# (M, N, K, outliers): odd M and N, one and several 64-row / 64-column tiles, Kb % 64 != 0
# (padding; Kbp % 128 == 64 for the int4 byte loop's half stage), no outliers, SmolLM2's width
QUIK_CASES = [
    (1, 72, 200, 8),
    (3, 13, 576, 32),
    (17, 130, 300, 16),
    (65, 64, 128, 0),
    (7, 200, 1000, 96),
]


@pytest.mark.parametrize("kernel", cuda_quik.SPLIT_KERNELS)
@pytest.mark.parametrize("bits,path", [(4, "s4"), (4, "s8"), (8, None)])
@pytest.mark.parametrize("m,n,k,n_out", QUIK_CASES)
def test_quik_bit_exact(m, n, k, n_out, bits, path, kernel):
    emu = run_quik(m, n, k, n_out, bits, path, torch.float16, kernel=kernel)
    assert emu.launches[0][0] == {"row": "quik_split_f16", "wide": "quik_split_wide_f16"}[kernel]
    if kernel == "wide":  # and the launcher's own choice: wide up to 64 rows, then the first kernel
        emu = run_quik(m, n, k, n_out, bits, path, torch.float16)
        assert emu.launches[0][0] == ("quik_split_wide_f16" if m <= 64 else "quik_split_f16")


@pytest.mark.parametrize("kernel", cuda_quik.SPLIT_KERNELS)
@pytest.mark.parametrize("bits,path", [(4, "s4"), (4, "s8"), (8, None)])
def test_quik_bf16(bits, path, kernel):
    run_quik(17, 130, 300, 16, bits, path, torch.bfloat16, kernel=kernel)


# (M, N, K, outliers) for the W8A8 GEMV: 1 to 8 rows, N odd (the last warp's second column past N),
# 36 chunks of 16 bytes per row (not a multiple of 32 lanes), 256 and 880 chunks (a partial unrolled
# step: down_proj's 14080 base channels)
GEMV_CASES = [(1, 13, 600, 24), (2, 33, 4096, 0), (5, 17, 4352, 256), (8, 9, 14336, 256)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,path", [(8, None), (4, "s8")])  # W4A4: packed weights, the codes one per byte
@pytest.mark.parametrize("m,n,k,n_out", GEMV_CASES)
def test_gemv_bit_exact(m, n, k, n_out, bits, path, dtype):
    emu = run_quik(m, n, k, n_out, bits, path, dtype)
    assert emu.launches[1][0] == f"quik_gemv_w{bits}a{bits}_{'bf16' if dtype == torch.bfloat16 else 'f16'}"
    assert emu.launches[1][1] == (-(-n // cuda_quik.GV_COLS_PER_CTA), 1, 1)
    run_quik(m, n, k, n_out, bits, path, dtype, gemm_kernel="tile")  # the tile kernel on the same case


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,n_out", [(9, 72, 200, 8), (17, 130, 300, 16), (65, 64, 128, 0), (130, 200, 1000, 96)])
def test_w8a8_on_int_mm_bit_exact(m, n, k, n_out, dtype):
    """W8A8 above the GEMV's rows on torch._int_mm (its operands padded as CUDA needs them: the product's
    rows ld = N rounded up to 8 apart) and quik_epilogue_rows: the reference's accumulator and y bit
    for bit, as the tile kernel's; the launcher's default where N % 8 == 0."""
    emu = run_quik(m, n, k, n_out, 8, None, dtype, gemm_kernel="int_mm")
    name, grid, args = emu.launches[-1]
    assert name == f"quik_epilogue_rows_{'bf16' if dtype == torch.bfloat16 else 'f16'}" and grid == (m, 1, 1)
    assert args["ld"] == max(16, n + -n % 8)
    run_quik(m, n, k, n_out, 8, None, dtype, gemm_kernel="tile")
    default = run_quik(m, n, k, n_out, 8, None, dtype).launches[-1][0]
    assert default.startswith("quik_epilogue_rows_" if n % 8 == 0 else "quik_gemm_w8a8_")


def test_the_gemv_is_refused_where_it_does_not_apply():
    x, base_idx, outlier_idx, q, wscale, wsum, _ = quik_case(9, 16, 200, 8, 8, torch.float16, seed=4)
    with emulate.emulating():
        xq, s, z, _ = cuda_quik.split_quantize(x, base_idx, outlier_idx, 8, False)
        with pytest.raises(ValueError, match="gemv: at most 8 rows"):
            cuda_quik.quik_gemm(xq, s, z, q, wscale, wsum, None, 8, torch.float16, kernel="gemv")
        xq4, s4, z4, _ = cuda_quik.split_quantize(x, base_idx, outlier_idx, 4, True)  # packed codes: the s4 tile kernel only
        with pytest.raises(ValueError, match="activation codes one per byte"):
            cuda_quik.quik_gemm(xq4[:2], s4[:2], z4[:2], pack_int4(q.clamp(-8, 7)), wscale, wsum, None, 4, torch.float16,
                                kernel="gemv")


def run_fused(m, n, k, n_out, bits, pack, dtype, clip=1.0, width=None, cancel=False, mutations=frozenset()):
    """The wide split with the outlier product in its launch (``split_outliers``) on the emulator:
    xq, s, z equal the reference's and y_out equals reference.outlier_product_lanes bit for bit.
    ``cancel``: outlier channels h .. 2h-1 repeat channels 0 .. h-1 (h = n_out / 2, a multiple of 64:
    each lane sums at least two products and their negations) with negated weights, so every exact
    sum is 0 and y_out is the float32 rounding left over, which depends on the order of the sums."""
    x, base_idx, outlier_idx, _, _, _, w_out = quik_case(m, n, k, n_out, bits, dtype, seed=5 * m + n + k)
    w_out = w_out.half()  # the layer stores fp16 outlier weights whatever the activations' dtype
    if cancel:
        h = n_out // 2
        spread = 2.0 ** torch.randint(-6, 7, (h,), generator=torch.Generator().manual_seed(n_out))  # exponents apart:
        x[:, outlier_idx[:h]] *= spread.to(dtype)  # the products' sums need more than float32's 24 bits
        x[:, outlier_idx[h:2 * h]] = x[:, outlier_idx[:h]]
        w_out[:, h:2 * h] = -w_out[:, :h]
    with emulate.emulating(mutations=mutations) as emu:
        xq, s, z, y_out = cuda_quik.split_outliers(x, base_idx, outlier_idx, w_out, bits, pack, clip, width)
    rq, rs, rz, rx = refq.quantize_split(x, base_idx, outlier_idx, bits, clip)
    if width is not None:
        rq = torch.nn.functional.pad(rq, (0, width - rq.shape[1]))
    assert torch.equal(unpack_int4(xq) if pack else xq, rq), "split: xq differs"
    assert torch.equal(s, rs) and torch.equal(z, rz), "split: s or z differs"
    want = refq.outlier_product_lanes(rx, w_out)
    assert y_out.dtype == dtype and torch.equal(y_out.view(torch.int16), want.view(torch.int16)), \
        f"y_out differs in {(y_out != want).sum()} places"
    if cancel:
        assert (want != 0).float().mean() > 0.25, "the cancelling case left no rounding to see"
    exact = refq.outlier_product(rx, w_out)  # the float32 matmul, within the output rounding
    assert torch.allclose(y_out.float(), exact, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=1e-4)
    assert [name for name, *_ in emu.launches] == [f"quik_split_wide_{'bf16' if dtype == torch.bfloat16 else 'f16'}"]
    assert emu.launches[0][1][0] == m + -(-n // cuda_quik.GEMV_COLS)
    return emu


# (M, N, K, outliers, width): one row, 8 rows, N not a multiple of 32, outliers not a multiple of 32,
# Kbp % 128 == 64, the repacked path's wider xq, and 15936 base channels (the last register slot)
FUSED_CASES = [
    (1, 72, 200, 8, None),
    (3, 37, 576, 33, None),
    (8, 200, 1000, 96, 1024),
    (2, 64, 4096, 256, None),
    (2, 40, 16000, 64, None),
]


@pytest.mark.parametrize("bits,pack", [(4, True), (4, False), (8, False)])
@pytest.mark.parametrize("m,n,k,n_out,width", FUSED_CASES)
def test_split_with_the_outlier_product_bit_exact(m, n, k, n_out, width, bits, pack):
    run_fused(m, n, k, n_out, bits, pack, torch.float16, width=width)


@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_split_with_the_outlier_product_bf16(clip):
    run_fused(5, 70, 600, 40, 4, False, torch.bfloat16, clip)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_outlier_product_sums_in_the_kernels_order(dtype):
    """Sums whose exact value is 0: y_out is the float32 rounding left over, so it equals the
    reference only when the order of every product and sum is the kernel's."""
    run_fused(3, 37, 576, 256, 4, True, dtype, cancel=True)


def test_the_fused_outlier_product_is_refused_beyond_its_bounds():
    x, base_idx, outlier_idx, _, _, _, w_out = quik_case(9, 16, 200, 8, 4, torch.float16, seed=2)
    with emulate.emulating():
        with pytest.raises(ValueError, match="1..8 rows"):
            cuda_quik.split_outliers(x, base_idx, outlier_idx, w_out, 4, False)
        with pytest.raises(ValueError, match="w_out must be float16"):
            cuda_quik.split_outliers(x[:2], base_idx, outlier_idx, w_out.bfloat16(), 4, False)
        with pytest.raises(ValueError, match="at most 16384 base channels"):
            cuda_quik.split_quantize(x, base_idx, outlier_idx, 4, False, width=16448, kernel="wide")
        assert cuda_quik.split_quantize(x, base_idx, outlier_idx, 4, False, width=16448)[0].shape == (9, 16448)
    assert cuda_quik.default_split(64, 16384) == "wide" and cuda_quik.default_split(65, 64) == "row"
    assert cuda_quik.default_split(1, 16448) == "row"
    assert cuda_quik.fuses_outliers(8, 16384, 1024) and not cuda_quik.fuses_outliers(9, 100, 8)
    assert not cuda_quik.fuses_outliers(1, 16385, 8) and not cuda_quik.fuses_outliers(1, 100, 0)
    assert not cuda_quik.fuses_outliers(1, 100, 1025)


@pytest.mark.parametrize("clip,dtype", [(0.9, torch.float16), (0.7, torch.bfloat16), (1 / 3, torch.float16)])
@pytest.mark.parametrize("bits,path", [(4, "s4"), (4, "s8"), (8, None)])
def test_quik_clipped_activations_bit_exact(bits, path, clip, dtype):
    """The activation clip (quik-w4a4's act_clip): the kernel's shrunken range, its saturated codes
    and s, z equal the reference's, with a clip that float32 cannot hold exactly (1/3)."""
    emu = run_quik(17, 130, 300, 16, bits, path, dtype, clip)
    x, base_idx, outlier_idx, *_ = quik_case(17, 130, 300, 16, bits, dtype, seed=7 * 17 + 130 + 300)
    half = 1 << (bits - 1)

    def saturated(c):  # codes at either end of the grid, over the 284 base channels
        xq = refq.quantize_split(x, base_idx, outlier_idx, bits, c)[0][:, :284]
        return int(((xq == -half) | (xq == half - 1)).sum())
    assert saturated(clip) > saturated(1.0), "the clip saturated no more values than the full range"
    assert emu.launches[0][2]["clip"] == torch.tensor(clip, dtype=torch.float32).item()


def test_a_float_argument_must_be_float32():
    """CuPy passes a Python float as a double: the emulator refuses what the kernel would misread."""
    x, base_idx, outlier_idx, *_ = quik_case(3, 8, 100, 4, 4, torch.float16, seed=1)
    args = [0] * 14 + [0.9]
    with emulate.emulating() as emu, pytest.raises(emulate.EmulationError, match="argument clip is float, not numpy.float32"):
        emu("quik_split_f16", (3,), (256,), args, 0, cuda_quik.SOURCE)


def test_quik_linear_on_the_emulator_matches_the_cpu_layer():
    """quik_linear (the runtime's CUDA path, both int4 paths) equals the split + GEMM reference fed
    the same outlier product."""
    x, base_idx, outlier_idx, q, wscale, wsum, w_out = quik_case(33, 96, 384, 32, 4, torch.float16, seed=3)
    for m in (33, 8):  # 33 rows: the split, then cuBLAS's outlier product; 8: the product in the split's launch
        rq, rs, rz, rx = refq.quantize_split(x[:m], base_idx, outlier_idx, 4)
        y_out = torch.matmul(rx, w_out.t()) if m > 8 else refq.outlier_product_lanes(rx, w_out)
        want = refq.quik_gemm(rq, rs, rz, q, wscale, wsum, y_out.float()).half()
        for path in ("s4", "s8"):
            with emulate.emulating() as emu:
                y = cuda_quik.quik_linear(x[:m], base_idx, outlier_idx, pack_int4(q), wscale, wsum, w_out, 4, path=path)
            assert torch.equal(y.view(torch.int16), want.view(torch.int16)), (m, path)
            gemm = f"quik_gemm_w4a4_{path}_f16" if m > 8 else "quik_gemv_w4a4_f16"  # at decode, either path: the GEMV
            assert [name for name, *_ in emu.launches] == ["quik_split_wide_f16", gemm]
            assert (emu.launches[0][2]["w_out"] != 0) == (m <= 8) and emu.launches[0][2]["pack"] == (path == "s4" and m > 8)


@pytest.mark.parametrize("bits", [4, 8])
def test_quik_layer_made_by_the_method_runs_on_the_kernels(bits):
    """A QuikLinear as the QUIK method makes it (the tensors written to disk) through the CUDA path's
    call (quik_linear with the layer's own tensors) on the emulator, against the reference fed the
    same fp16 outlier product: the layout's conventions (int4 packing, base and outlier indices,
    wsum, the outlier weight's dtype) are the ones the kernels read."""
    from test_quik import _problem

    from qconvert.layouts.quik import QuikLinear
    from qconvert.methods.quik import QuikMethod

    w, h, x = _problem(n=72, k=200, rows=512, outliers=(5, 77, 190))
    meth = QuikMethod({"bits": bits, "outliers": 16, "base": "rtn", "act_clip": 0.9})
    ql = meth.quantize_linears(["m.layers.0.mlp.up_proj"], [w], h, input_amax=x.abs().amax(0))[0]
    assert ql.layout == f"quik-w{bits}a{bits}" and len(ql.tensors["outlier_idx"]) == 16
    lin = QuikLinear(ql.layout, ql.tensors, None, act_clip=0.9)
    xs = x[:17].half()
    rq, rs, rz, rx = refq.quantize_split(xs, lin.base_idx, lin.outlier_idx, bits, 0.9)
    y_out = torch.matmul(rx, lin.outlier_weight.to(xs.dtype).t())
    want = refq.quik_gemm(rq, rs, rz, lin.weights_int8(), lin.wscale, lin.wsum, y_out.float()).half()
    for path in (["s4", "s8"] if bits == 4 else [None]):
        with emulate.emulating():
            y = cuda_quik.quik_linear(xs, lin.base_idx, lin.outlier_idx, lin.qweight, lin.wscale, lin.wsum,
                                      lin.outlier_weight, lin.bits, path=path, clip=lin.act_clip)
        assert torch.equal(y.view(torch.int16), want.view(torch.int16)), path
    # and the layer's CPU forward is the same computation with a float32 outlier product
    assert float((lin(xs.float()) - want.float()).norm() / want.float().norm()) < 2e-3


def illm_case(m, n, k, w_bits):
    """(xq, the weights as stored (int8, or packed int4), mantissas, exponents, the reference t)."""
    gen = torch.Generator().manual_seed(m + n + k)
    qmax = 127 if w_bits == 8 else 7
    xq = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    q = torch.randint(-qmax - 1, qmax + 1, (n, k), generator=gen, dtype=torch.int8)
    wm = torch.randint(2**15, 2**16, (n,), generator=gen, dtype=torch.int32)
    wk = torch.randint(20, 30, (n,), generator=gen, dtype=torch.int32)
    want = ri.shift(ri.int8_matmul(xq, q.t()) * wm.long(), wk.long() - wk.long().min())
    return xq, pack_int4(q) if w_bits == 4 else q, wm, wk, want


def run_illm(m, n, k, w_bits, mutations=frozenset()):
    """DI-MatMul's 64 x 64 tile kernel above the GEMV's rows (the default there for w8 is torch._int_mm:
    tests/test_kernels_illm_emulate.py), the GEMV at M <= 8."""
    xq, qw, wm, wk, want = illm_case(m, n, k, w_bits)
    with emulate.emulating(mutations=mutations) as emu:
        got = cuda_illm.illm_matmul(xq, qw, wm, wk, w_bits, kernel=None if m <= cuda_illm.GEMV_ROWS else "tile")
    assert torch.equal(got, want), f"t differs in {(got != want).sum()} places"
    return emu


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("m,n,k", [(1, 72, 96), (17, 130, 288), (66, 13, 160)])  # K % 64 == 32: a half stage
def test_illm_matmul_bit_exact(m, n, k, w_bits):
    run_illm(m, n, k, w_bits)


def run_native(m, n, k, g, layout, dtype=torch.float16, mutations=frozenset()):
    """w4a8_gemm.cu's native-layout GEMMs (and its int8 quantizer) on the emulator against the
    reference: the group folds of the shared main loop, the IS int32 / FS float accumulators."""
    from qconvert_kernels.w4a8 import reference as ref

    gen = torch.Generator().manual_seed(m * 7 + n * 13 + k + g)
    kp = -(-k // g) * g
    q = torch.randint(-8, 8, (n, kp), generator=gen, dtype=torch.int8)
    q[:, k:] = 0
    x = (torch.randn((m, k), generator=gen) * 3).to(dtype)
    with emulate.emulating(mutations=mutations):
        xq, t = kcuda.quantize_per_token_int8(x, kp)
        if layout == "w4a8-is":
            iscale = torch.randint(1, 200, (n, kp // g), generator=gen, dtype=torch.int32)
            cscale = torch.rand(n, generator=gen) * 0.01 + 1e-4
            y, acc = kcuda.w4a8_is_gemm(xq, t, pack_int4(q), iscale, cscale, 8, g, dtype, return_acc=True)
        else:
            scales = (torch.rand((n, kp // g), generator=gen) * 0.02 + 1e-4).half()
            y = kcuda.w4a8_fs_gemm(xq, t, pack_int4(q), scales, g, dtype)
    rxq, rt = ref.quantize_per_token_int8(x, kp)
    assert torch.equal(xq, rxq) and torch.equal(t, rt), "quantizer differs"
    if layout == "w4a8-is":
        want, racc = ref.w4a8_is_gemm(rxq, rt, q, iscale, cscale, 8, g, return_acc=True)
        assert torch.equal(acc, racc), "int32 accumulator differs"
    else:
        want = ref.w4a8_fs_gemm(rxq, rt, q, scales, g)
    want = want.to(dtype)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"y differs in {(y != want).sum()} places"


@pytest.mark.parametrize("layout", ["w4a8-is", "w4a8-fs"])
@pytest.mark.parametrize("m,n,k,g", [(1, 72, 256, 128), (17, 130, 300, 96), (66, 13, 160, 32), (3, 64, 96, 32)])
def test_native_w4a8_gemms_bit_exact(m, n, k, g, layout):
    run_native(m, n, k, g, layout)


def test_native_w4a8_bf16():
    run_native(17, 130, 300, 96, "w4a8-is", torch.bfloat16)
    run_native(17, 130, 300, 96, "w4a8-fs", torch.bfloat16)


# ----------------------------------------------------------------------------- the emulator itself


def test_s4_fragment_tables_against_a_per_element_model():
    """mma_m16n8k64_s4 equals a per-lane, per-nibble loop over the PTX ISA layout of .s4."""
    gen = np.random.default_rng(1)
    a = gen.integers(0, 2**32, (1, 32, 4), dtype=np.uint64).astype(np.uint32)
    b = gen.integers(0, 2**32, (1, 32, 2), dtype=np.uint64).astype(np.uint32)
    c = gen.integers(-1000, 1000, (1, 32, 4)).astype(np.int32)
    nib = lambda r, i: ((int(r) >> (4 * i)) & 15) - (16 if (int(r) >> (4 * i)) & 8 else 0)  # noqa: E731
    A = [[0] * 64 for _ in range(16)]
    B = [[0] * 8 for _ in range(64)]
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        for i in range(32):  # a_i: row gid (+8 for i in 8..15, 24..31), col 8 tig + i % 8 (+32 for i >= 16)
            row = gid + (8 if (8 <= i < 16 or i >= 24) else 0)
            A[row][8 * tig + (i & 7) + (32 if i >= 16 else 0)] = nib(a[0, lane, i // 8], i % 8)
        for i in range(16):  # b_i: row 8 tig + i % 8 (+32 for i >= 8), col gid
            B[8 * tig + (i & 7) + (32 if i >= 8 else 0)][gid] = nib(b[0, lane, i // 8], i % 8)
    d = emulate.mma_m16n8k64_s4(a, b, c)
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        for i in range(4):
            r, col = gid + (8 if i >= 2 else 0), 2 * tig + (i & 1)
            assert d[0, lane, i] == c[0, lane, i] + sum(A[r][k] * B[k][col] for k in range(64))


def test_unpack_and_byte_perm_decode_nibbles_in_k_order():
    words = np.array([0, 0xFFFFFFFF, 0x88888888, 0x77777777, 0x76543210, 0xFEDCBA98], np.uint32)
    words = np.concatenate([words, np.random.default_rng(2).integers(0, 2**32, 500, dtype=np.uint64).astype(np.uint32)])
    ctx = emulate.Ctx(None, {}, frozenset(), emulate.FloatOps(False))
    b0, b1 = emulate.unpack_int4x8(ctx, words)
    got = np.concatenate([b0[:, None].view(np.int8).reshape(-1, 4), b1[:, None].view(np.int8).reshape(-1, 4)], 1)
    want = ((words[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).astype(np.int64)
    assert (got == want - 16 * (want >= 8)).all()


def test_constants_match_the_sources():
    def const(text, name):
        return re.search(rf"constexpr int {name} = ([^;]+);", text).group(1).split("//")[0].strip()

    for name in ("BM", "BN", "BK", "THREADS", "WM", "WN", "A_STRIDE", "B_STRIDE"):
        assert int(const(MAINLOOP_W4, name)) == getattr(emulate, name), name
    assert kcuda.BLOCK_M == cuda_illm.BLOCK_M == emulate.BM and kcuda.GEMM_THREADS == cuda_illm.GEMM_THREADS == emulate.THREADS
    assert kcuda.QUANT_THREADS == emulate.QUANT_THREADS
    quik_text = cuda_quik.SOURCE.read_text()
    for name in ("WIDE_THREADS", "WIDE_SLOTS", "FUSED_ROWS"):
        assert int(const(quik_text, name)) == getattr(emulate, name), name
    assert const(quik_text, "FUSED_MAX_OUT") == "WIDE_THREADS" and emulate.FUSED_MAX_OUT == emulate.WIDE_THREADS
    assert const(quik_text, "WIDE_MAX_KB") == "2 * WIDE_THREADS * WIDE_SLOTS" and const(quik_text, "GEMV_COLS") == "WIDE_THREADS / 32"
    assert (cuda_quik.WIDE_THREADS, cuda_quik.FUSED_ROWS, cuda_quik.FUSED_MAX_OUT) == (emulate.WIDE_THREADS, emulate.FUSED_ROWS,
                                                                                       emulate.FUSED_MAX_OUT)
    assert cuda_quik.WIDE_MAX_KB == 2 * emulate.WIDE_THREADS * emulate.WIDE_SLOTS and cuda_quik.GEMV_COLS == emulate.GEMV_COLS
    for name in ("GV_ROWS", "GV_COLS", "GV_WARPS", "GV_UNROLL"):
        assert int(const(MAINLOOP_BYTES, name)) == getattr(emulate, name), name
    assert (cuda_illm.GEMV_ROWS, cuda_illm.GEMV_COLS_PER_CTA, cuda_illm.GEMV_THREADS) == (
        cuda_quik.GV_ROWS, cuda_quik.GV_COLS_PER_CTA, cuda_quik.GV_THREADS)
    assert (cuda_quik.GV_ROWS, cuda_quik.GV_COLS_PER_CTA, cuda_quik.GV_THREADS) == (emulate.GV_ROWS, emulate.GV_WARPS * emulate.GV_COLS,
                                                                                    emulate.GV_THREADS)
    assert "ROW_CHUNKS / THREADS" in MAINLOOP_BYTES and emulate.ROW_LOADS == 2

    quik_cu, illm_cu, native_cu = cuda_quik.SOURCE.read_text(), cuda_illm.SOURCE.read_text(), kcuda.SOURCE.read_text()
    assert macro_params(quik_cu, "QUIK_GEMM_ARGS") == emulate.GEMM_PARAMS
    assert macro_params(quik_cu, "QUIK_EPI_ARGS") == emulate.EPI_PARAMS
    assert macro_params(illm_cu, "ILLM_MATMUL_ARGS") == emulate.ILLM_PARAMS
    assert macro_params(quik_cu, "QUIK_SPLIT") == emulate.SPLIT_PARAMS
    assert macro_params(quik_cu, "QUIK_SPLIT_WIDE") == emulate.SPLIT_WIDE_PARAMS
    assert macro_params(native_cu, "QK_IS_GEMM") == emulate.IS_PARAMS
    assert macro_params(native_cu, "QK_FS_GEMM") == emulate.FS_PARAMS
    assert macro_params(native_cu, "QK_QUANT")[:5] == emulate.W4A8_QUANT_PARAMS[:5]  # the last: Kp here, Kq in the twin


def test_fragment_loads_are_bank_conflict_free():
    """The padded rows (96 bytes) make every fragment load conflict-free, as the sources say."""
    conflicts = {}
    for bits, path in ((8, None), (4, "s4"), (4, "s8")):
        conflicts.update(run_quik(17, 130, 300, 16, bits, path, torch.float16).conflicts)
    for site in ("bytes A LDS.64", "bytes B LDS.64", "w4 A LDS.64", "w4 B LDS.32"):
        assert conflicts[site] == 1, (site, conflicts[site])


def test_unknown_kernel_and_wrong_launches_are_refused():
    emu = emulate.Emulator()
    with pytest.raises(emulate.EmulationError, match="no emulation"):
        emu("fp8_gemm_f16", (1, 1), (128,), (), 0, cuda_quik.SOURCE)
    with pytest.raises(emulate.EmulationError, match="written for 128 threads"):
        emu("quik_gemm_w8a8_f16", (1, 1), (256,), (0,) * 12, 0, cuda_quik.SOURCE)
    with pytest.raises(ValueError, match="unknown mutations"):
        emulate.Emulator(mutations=frozenset({"nope"}))("quik_gemm_w8a8_f16", (1, 1), (128,), (), 0, cuda_quik.SOURCE)


# ----------------------------------------------------------------------------- mutations

MUTATION_CASES = {
    # mutation: (runner, args, expected: "error" (an emulator check fires) or "differs")
    "swap_a": (run_quik, (17, 130, 300, 16, 8, None, torch.float16), "differs"),
    "b_offset": (run_quik, (3, 72, 576, 32, 4, "s4", torch.float16), "error"),
    "b_swap": (run_quik, (3, 72, 576, 32, 4, "s4", torch.float16), "differs"),
    "no_tail_sync": (run_illm, (17, 72, 288, 8), "error"),
    "no_row_bound": (run_quik, (17, 72, 200, 8, 4, "s8", torch.float16), "error"),
    "no_sign": (run_illm, (17, 72, 96, 4), "differs"),  # M > 8: the tile kernel
    "c_map": (run_quik, (17, 13, 576, 32, 8, None, torch.bfloat16), "differs"),  # M > 8: the tile kernel
    "split_short": (run_quik, (3, 13, 576, 32, 8, None, torch.float16), "error"),
    "no_clip": (run_quik, (3, 13, 576, 32, 4, "s4", torch.float16, 0.9), "differs"),
    "fold_stale": (run_native, (3, 64, 96, 32, "w4a8-is"), "differs"),
    "wide_slots": (run_fused, (2, 40, 16000, 64, 4, False, torch.float16), "error"),
    "wide_pair_swap": (run_fused, (3, 37, 576, 33, 8, False, torch.float16), "differs"),
    "gemv_stride": (run_quik, (2, 33, 4096, 0, 8, None, torch.float16), "differs"),
    "gemv4_no_sign": (run_illm, (5, 33, 288, 4), "differs"),  # DI-MatMul w4 at M <= 8: the w4 GEMV
    "gemv4_perm": (run_quik, (5, 17, 600, 24, 4, "s8", torch.float16), "differs"),  # QUIK W4A4's GEMV
    "gemv_lane_map": (run_quik, (5, 17, 600, 24, 8, None, torch.float16), "differs"),
    "outlier_seq": (run_fused, (3, 37, 576, 256, 4, True, torch.float16, 1.0, None, True), "differs"),
    # W8A8 on torch._int_mm with N = 130: the product's rows 136 apart
    "epi_ld_dense": (functools.partial(run_quik, gemm_kernel="int_mm"), (17, 130, 300, 16, 8, None, torch.float16), "differs"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATION_CASES))
def test_mutation_is_caught(mutation):
    runner, args, expected = MUTATION_CASES[mutation]
    assert_mutation_caught(runner, args, mutation, expected, emulate.EmulationError)
    runner(*args)  # and the same case passes without it


def test_every_mutation_has_a_test():
    assert set(MUTATION_CASES) == set(emulate.MUTATIONS)
