"""The QUIK CUDA kernels against the bit-exact torch reference (needs cupy and an sm_80+ GPU).

The split kernels' xq, s, z and x_out must equal the reference exactly (and the fused outlier
product reference.outlier_product_lanes, bit for bit); the GEMMs' int32
accumulators exactly, and y within 1 ulp of the reference's float32 result (fed the same cuBLAS
outlier product) rounded to fp16 / bf16.  Both 4-bit paths (s4, s8) run where the device has
them: s4 needs int4 tensor cores (sm_80 .. sm_89).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert.formats.packing import pack_int4, unpack_int4  # noqa: E402
from qconvert_kernels.w4a8 import cuda as kcuda  # noqa: E402
from qconvert_kernels.quik import cuda as cuda_quik  # noqa: E402
from qconvert_kernels.quik import reference as refq  # noqa: E402
from test_kernels_gpu import _ulps  # noqa: E402
from test_kernels_quik_emulate import quik_case as _case  # noqa: E402

if not kcuda.available():
    pytest.skip("no CUDA device usable by cupy (sm_80+)", allow_module_level=True)

DEV = torch.device("cuda")
DTYPES = [torch.float16, torch.bfloat16]
# (M, N, K, outliers): SmolLM2 and Llama-3 widths, odd M / N, Kb % 64 != 0 (padding), no outliers
SHAPES = [(1, 576, 576, 32), (3, 1536, 576, 32), (17, 576, 1536, 96), (130, 192, 4096, 256),
          (1, 4096, 4096, 256), (257, 72, 1000, 0), (64, 13, 300, 16)]
PATHS_4 = ["s8"] + (["s4"] if cuda_quik.int4_path(DEV) == "s4" else [])


@pytest.mark.parametrize("kernel", cuda_quik.SPLIT_KERNELS)
@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,pack", [(4, True), (4, False), (8, False)])
@pytest.mark.parametrize("m,n,k,n_out", SHAPES)
def test_split_quantize_is_exact(m, n, k, n_out, bits, pack, dtype, clip, kernel):
    x, base_idx, outlier_idx, *_ = _case(m, n, k, n_out, bits, dtype, seed=m + k)
    xq, s, z, x_out = cuda_quik.split_quantize(x.to(DEV), base_idx.to(DEV), outlier_idx.to(DEV), bits, pack, clip,
                                               kernel=kernel)
    rq, rs, rz, rx = refq.quantize_split(x, base_idx, outlier_idx, bits, clip)
    got = unpack_int4(xq.cpu()) if pack else xq.cpu()
    assert torch.equal(got, rq)
    assert torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz)
    assert torch.equal(x_out.cpu(), rx)


# (M, N, K, outliers): the decode rows the split's launch makes the outlier product for; Llama-3's
# q/o, an odd N and outlier count, and 15936 base channels (every register slot of the wide split)
FUSED_SHAPES = [(1, 4096, 4096, 256), (8, 4096, 4096, 256), (3, 37, 576, 33), (2, 200, 16000, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,pack", [(4, True), (4, False), (8, False)])
@pytest.mark.parametrize("m,n,k,n_out", FUSED_SHAPES)
def test_split_with_the_outlier_product_is_exact(m, n, k, n_out, bits, pack, dtype):
    """``split_outliers``: xq, s, z as the reference's, and y_out bit for bit as
    reference.outlier_product_lanes sums it (the kernel's order of products and sums)."""
    x, base_idx, outlier_idx, *_, w_out = _case(m, n, k, n_out, bits, dtype, seed=3 * m + k)
    w_out = w_out.half()
    xq, s, z, y_out = cuda_quik.split_outliers(x.to(DEV), base_idx.to(DEV), outlier_idx.to(DEV), w_out.to(DEV), bits, pack)
    rq, rs, rz, rx = refq.quantize_split(x, base_idx, outlier_idx, bits)
    assert torch.equal(unpack_int4(xq.cpu()) if pack else xq.cpu(), rq)
    assert torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz)
    want = refq.outlier_product_lanes(rx, w_out)
    assert torch.equal(y_out.cpu().view(torch.int16), want.view(torch.int16)), int((y_out.cpu() != want).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,path", [(4, p) for p in PATHS_4] + [(8, None)])
@pytest.mark.parametrize("m,n,k,n_out", SHAPES)
def test_gemm_matches_reference(m, n, k, n_out, bits, path, dtype):
    x, base_idx, outlier_idx, q, wscale, wsum, w_out = _case(m, n, k, n_out, bits, dtype, seed=7 * m + n)
    pack = path == "s4"
    xq, s, z, x_out = cuda_quik.split_quantize(x.to(DEV), base_idx.to(DEV), outlier_idx.to(DEV), bits, pack)
    y_out = torch.matmul(x_out, w_out.to(DEV, dtype).t()) if n_out else None
    qw = pack_int4(q) if bits == 4 else q
    y, acc = cuda_quik.quik_gemm(xq, s, z, qw.to(DEV), wscale.to(DEV), wsum.to(DEV), y_out, bits, dtype, return_acc=True)
    rq, rs, rz, _ = refq.quantize_split(x, base_idx, outlier_idx, bits)
    ry, racc = refq.quik_gemm(rq, rs, rz, q, wscale, wsum, y_out.float().cpu() if n_out else torch.zeros(m, n), return_acc=True)
    assert torch.equal(acc.cpu(), racc)
    assert (int(_ulps(y.cpu(), ry.to(dtype)).max()) if y.numel() else 0) <= 1  # torch's max takes no `initial`


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m,n,k,n_out", [(1, 4096, 14336, 256), (8, 4096, 14336, 256), (5, 37, 600, 24)])
def test_gemv_matches_reference_and_the_tile_kernel(m, n, k, n_out, bits, dtype):
    """The GEMVs (M <= 8; W8A8: the quik-w4a4 preset's 8-bit down_proj at decode; W4A4: the 4-bit
    layers at decode off sm_90): exact int32 sums, and the same bits as the 64 x 64 tile kernel (s8
    for 4 bits) on the same operands (the same epilogue formula)."""
    x, base_idx, outlier_idx, q, wscale, wsum, w_out = _case(m, n, k, n_out, bits, dtype, seed=m + n)
    xq, s, z, x_out = cuda_quik.split_quantize(x.to(DEV), base_idx.to(DEV), outlier_idx.to(DEV), bits, False)
    y_out = torch.matmul(x_out, w_out.to(DEV, dtype).t()) if n_out else None
    args = (xq, s, z, (pack_int4(q) if bits == 4 else q).to(DEV), wscale.to(DEV), wsum.to(DEV), y_out, bits, dtype)
    y, acc = cuda_quik.quik_gemm(*args, return_acc=True, kernel="gemv")
    yt, acct = cuda_quik.quik_gemm(*args, return_acc=True, kernel="tile")
    rq, rs, rz, _ = refq.quantize_split(x, base_idx, outlier_idx, bits)
    _, racc = refq.quik_gemm(rq, rs, rz, q, wscale, wsum, y_out.float().cpu() if n_out else torch.zeros(m, n), return_acc=True)
    assert torch.equal(acc.cpu(), racc) and torch.equal(acct, acc)
    assert torch.equal(y.view(torch.int16), yt.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,n_out", [(65, 4096, 14336, 256), (17, 4096, 14336, 256), (130, 37, 600, 24)])
def test_w8a8_on_int_mm_matches_reference_and_the_tile_kernel(m, n, k, n_out, dtype):
    """W8A8 above 8 rows (the quik-w4a4 preset's 8-bit down_proj at prefill, and an odd N: the product
    padded to 40 columns): torch._int_mm's exact int32 sums and quik_epilogue_rows give the tile
    kernel's bits."""
    x, base_idx, outlier_idx, q, wscale, wsum, w_out = _case(m, n, k, n_out, 8, dtype, seed=m + n)
    xq, s, z, x_out = cuda_quik.split_quantize(x.to(DEV), base_idx.to(DEV), outlier_idx.to(DEV), 8, False)
    y_out = torch.matmul(x_out, w_out.to(DEV, dtype).t())
    args = (xq, s, z, q.to(DEV), wscale.to(DEV), wsum.to(DEV), y_out, 8, dtype)
    y, acc = cuda_quik.quik_gemm(*args, return_acc=True, kernel="int_mm")
    yt, acct = cuda_quik.quik_gemm(*args, return_acc=True, kernel="tile")
    rq, rs, rz, _ = refq.quantize_split(x, base_idx, outlier_idx, 8)
    _, racc = refq.quik_gemm(rq, rs, rz, q, wscale, wsum, y_out.float().cpu(), return_acc=True)
    assert torch.equal(acc.cpu(), racc) and torch.equal(acct, acc)
    assert torch.equal(y.view(torch.int16), yt.view(torch.int16))


def test_quik_layer_on_cuda_matches_cpu_reference(tmp_path):
    """A QuikLinear on cuda (split, cuBLAS outliers, GEMM) against the same module on CPU."""
    from qconvert.layouts.quik import QuikLinear

    x, base_idx, outlier_idx, q, wscale, wsum, w_out = _case(33, 576, 1536, 96, 4, torch.float16, seed=1)
    tensors = {"qweight": pack_int4(q), "shape": torch.tensor([576, 1536]), "wscale": wscale, "wsum": wsum,
               "outlier_idx": outlier_idx.to(torch.int32), "outlier_weight": w_out}
    lin = QuikLinear("quik-w4a4", tensors, None, act_clip=0.9)  # the preset's clip
    ref = lin(x.float())
    got = lin.to(DEV)(x.to(DEV)).float().cpu()
    # only the outlier product differs (cuBLAS fp16 vs CPU float32), and the fp16 rounding
    assert float((got - ref).norm() / ref.norm()) < 2e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,n_out", SHAPES)
def test_repacked_gemm_matches_reference(m, n, k, n_out, dtype):
    """The "s8r" path (sm_90's default, runs on any sm_80+): the repacked W4A8 decode (M <= 64) and
    prefill kernels with QUIK's epilogue; exact int32 sums, y within 1 ulp as the other paths (bit for bit on the CPU
    emulator, tests/test_kernels_quik_repacked.py)."""
    x, base_idx, outlier_idx, q, wscale, wsum, w_out = _case(m, n, k, n_out, 4, dtype, seed=7 * m + n)
    prep = cuda_quik.prepare_repacked(pack_int4(q).to(DEV), wscale.to(DEV), wsum.to(DEV), DEV)
    xq, s, z, x_out = cuda_quik.split_quantize(x.to(DEV), base_idx.to(DEV), outlier_idx.to(DEV), 4, False, width=prep.kq)
    y_out = torch.matmul(x_out, w_out.to(DEV, dtype).t()) if n_out else None
    y, acc = cuda_quik.quik_gemm_repacked(xq, s, z, prep, y_out, dtype, return_acc=True)
    rq, rs, rz, _ = refq.quantize_split(x, base_idx, outlier_idx, 4)
    assert torch.equal(xq.cpu()[:, :rq.shape[1]], rq) and not xq[:, rq.shape[1]:].any()
    ry, racc = refq.quik_gemm(rq, rs, rz, q, wscale, wsum, y_out.float().cpu() if n_out else torch.zeros(m, n), return_acc=True)
    assert torch.equal(acc.cpu(), racc)
    assert (int(_ulps(y.cpu(), ry.to(dtype)).max()) if y.numel() else 0) <= 1


@pytest.mark.parametrize("m", [16, 1])
def test_repacked_layer_captures_in_a_cuda_graph(m):
    """quik_linear on the repacked path reads no device value on the host: captured once and
    replayed on new activations, it gives what it gives eagerly (M = 1: the outlier product in the
    split's launch)."""
    x, base_idx, outlier_idx, q, wscale, wsum, w_out = _case(m, 576, 1536, 96, 4, torch.float16, seed=2)
    args = [t.to(DEV) for t in (base_idx, outlier_idx, pack_int4(q), wscale, wsum, w_out)]
    prep = cuda_quik.prepare_repacked(args[2], wscale.to(DEV), wsum.to(DEV), DEV)
    static = x.to(DEV).clone()
    run = lambda: cuda_quik.quik_linear(static, *args, 4, path="s8r", prepared=prep)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up: modules built outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    static.copy_((x * 0.5).to(DEV))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, run())
