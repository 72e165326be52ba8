"""The ZeroQuant-FP CUDA kernels against the torch reference (needs cupy and an sm_89+ GPU).

The quantizer must match exactly.  The GEMMs match within the tolerance reference_fp8.py states:
|y - y_ref| <= 2^-9 * |y|_abs + 1 ulp of the output type, |y|_abs the sum of absolute products
(the tensor cores' accumulation inside a group is not specified by PTX; a wrong fragment layout,
k order or FP4 widening gives errors of the order of |y|_abs itself).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert.formats.fp4 import codes_to_values, pack_fp4  # noqa: E402
from qconvert_kernels.fp8 import cuda as cuda_fp8  # noqa: E402
from qconvert_kernels.fp8 import reference as ref8  # noqa: E402
from test_kernels_fp8_emulate import _activations, fp4_case, fp8_case  # noqa: E402

if not cuda_fp8.available():
    pytest.skip("no CUDA device of compute capability 8.9+ usable by cupy (FP8 mma)", allow_module_level=True)

DEV = torch.device("cuda")
DTYPES = [torch.float16, torch.bfloat16]
# (M, N, K, g): odd M, K = 576 padded to 640 by g = 128, Kp % 64 == 32, odd N, several g
SHAPES = [(1, 8, 576, 128), (3, 192, 576, 128), (17, 576, 4096, 128), (130, 192, 4096, 128),
          (17, 192, 4096, 32), (3, 576, 1000, 64), (17, 8, 96, 32), (3, 13, 300, 96), (257, 72, 256, 64)]


def _needs_row_wise(dtype) -> None:
    """Skip (named) where the installed torch's row-wise FP8 GEMM takes no output for ``dtype``
    activations (the layers then keep fp8_gemm.cu's kernel there: a limit of torch, not a failure)."""
    outs = cuda_fp8.scaled_mm_outputs(DEV)
    if not outs.get(dtype):
        pytest.skip(f"torch {torch.__version__}: no row-wise FP8 GEMM output for {dtype} activations here ({outs})")


def _within_tolerance(y, y_ref, y_abs, dtype):
    eps = torch.finfo(dtype).eps  # 1 ulp at 1.0; scaled by |y| below
    err = (y.float().cpu() - y_ref).abs()
    bound = 2.0**-9 * y_abs + eps * y_ref.abs() + torch.finfo(dtype).tiny
    return float((err / bound).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 576), (3, 4096), (17, 1000), (130, 96), (4, 1)])
def test_quantizer_bit_exact(m, k, dtype):
    gen = torch.Generator().manual_seed(m * 7919 + k)
    x = _activations(m, k, dtype, gen)
    kp = -(-k // 128) * 128
    xq, t = cuda_fp8.quantize_per_token_fp8(x.to(DEV), kp)
    xq_ref, t_ref = ref8.quantize_per_token_fp8(x, kp)
    assert torch.equal(xq.cpu().view(torch.uint8), xq_ref.view(torch.uint8))
    assert torch.equal(t.cpu(), t_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,g", SHAPES)
def test_fp4_fp8_gemm_matches_reference(m, n, k, g, dtype):
    x, codes, sexp, cscale, kp = fp4_case(m, n, k, g, dtype)
    xq, t = cuda_fp8.quantize_per_token_fp8(x.to(DEV), kp)
    y = cuda_fp8.fp4_fp8_gemm(xq, t, pack_fp4(codes).to(DEV), sexp.to(DEV), cscale.to(DEV), g, dtype)
    w = codes_to_values(codes)
    y_ref = ref8.fp4_fp8_gemm(xq.cpu(), t.cpu(), ref8.weight_groups(w, g), sexp, cscale)
    y_abs = ref8.fp4_fp8_gemm(xq.cpu().float().abs().to(torch.float8_e4m3fn), t.cpu(), ref8.weight_groups(w.abs(), g), sexp, cscale)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _within_tolerance(y, y_ref, y_abs, dtype) <= 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 8, 576), (17, 576, 4096), (130, 192, 1536), (3, 13, 96), (257, 72, 256)])
def test_fp8_fp8_gemm_matches_reference(m, n, k, dtype):
    x, wq, wscale, kp = fp8_case(m, n, k, dtype)
    xq, t = cuda_fp8.quantize_per_token_fp8(x.to(DEV), kp)
    y = cuda_fp8.fp8_fp8_gemm(xq, t, wq.to(DEV), wscale.to(DEV), dtype)
    y_ref = ref8.fp8_fp8_gemm(xq.cpu(), t.cpu(), wq, wscale)
    y_abs = ref8.fp8_fp8_gemm(xq.cpu().float().abs().to(torch.float8_e4m3fn), t.cpu(), wq.float().abs().to(torch.float8_e4m3fn), wscale)
    assert _within_tolerance(y, y_ref, y_abs, dtype) <= 1.0


@pytest.mark.parametrize("scheme_params", [{"base": "rtn", "lorc_rank": 4, "group_size": 64},
                                           {"weight_format": "fp8", "base": "rtn", "lorc_rank": 0}])
def test_runtime_layer_on_gpu_equals_cpu(scheme_params):
    from qconvert.methods.zeroquant_fp import ZeroQuantFPMethod
    from qconvert.layouts.fp8 import FP8Linear

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(192, 576, generator=gen) * 0.05
    ql = ZeroQuantFPMethod(scheme_params).quantize_linear("l", w)
    cpu = FP8Linear(ql.layout, ql.tensors, None)
    gpu = FP8Linear(ql.layout, {k: v.to(DEV) for k, v in ql.tensors.items()}, None)
    gpu.check_cuda("l")
    x = torch.randn(2, 7, 576, generator=gen).half()
    y_ref = cpu(x.float())
    y = gpu(x.to(DEV)).float().cpu()
    assert float((y - y_ref).norm() / y_ref.norm()) < 2e-3


def test_bench_rows_for_zqfp():
    from qconvert import bench as b

    row_wise = ["fp8-fp8-scaled"] if cuda_fp8.scaled_mm_outputs(DEV).get(torch.float16) else []
    rows = b.zqfp_kernel_rows("o_proj", 576, 576, 16, DEV, runs=50, warmup=2, reps=4)
    assert [r["kernel"] for r in rows] == ["cublas-fp16", "quantize-fp8", "fp4-fp8", "fp4-fp8-decode", "fp8-fp8", *row_wise]
    assert all(r["us"] > 0 for r in rows)
    rows = b.zqfp_kernel_rows("o_proj", 576, 576, 65, DEV, runs=50, warmup=2, reps=4)
    prefill = ["fp4-fp8-widen", "fp4-fp8-prefill"] if row_wise else []
    assert [r["kernel"] for r in rows] == ["cublas-fp16", "quantize-fp8", "fp4-fp8", *prefill, "fp8-fp8", *row_wise]


# ---- fp4-fp8 at decode on the repacked W4A8 decode kernel (fp8/fp8_repacked.cu via w4a8/cuda.py)
# (M, N, K, g): M from 1 to 64 (all four token tiles), odd N and K, Llama-3-8B's q/o and down_proj
ZQ_DECODE_SHAPES = [(1, 4096, 4096, 128), (8, 4096, 14336, 128), (3, 192, 576, 128), (17, 576, 4096, 32),
                    (33, 13, 300, 96), (64, 1024, 4096, 128), (1, 14336, 4096, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,g", ZQ_DECODE_SHAPES)
def test_repacked_decode_matches_reference_and_the_tile_kernel(m, n, k, g, dtype):
    from qconvert_kernels.w4a8 import cuda as kcuda

    x, codes, sexp, cscale, kp = fp4_case(m, n, k, g, dtype)
    tensors = {"qweight": pack_fp4(codes), "sexp": sexp, "cscale": cscale, "shape": torch.tensor([n, k])}
    prep = kcuda.prepare("fp4-fp8", tensors, g, DEV)
    y = kcuda.linear(x.to(DEV), prep)
    torch.cuda.synchronize()
    assert not prep.workspace.any(), "the workspace must return to zero"
    xq, t = ref8.quantize_per_token_fp8(x, kp)
    w = codes_to_values(codes)
    bounds = kcuda.plan(m, prep, kcuda.device_sm_count(DEV)).split_bounds()
    y_ref = ref8.fp4_fp8_gemm_split(xq, t, ref8.weight_groups(w, g), sexp, cscale, bounds)
    y_abs = ref8.fp4_fp8_gemm(xq.float().abs().to(torch.float8_e4m3fn), t, ref8.weight_groups(w.abs(), g), sexp, cscale)
    assert _within_tolerance(y, y_ref, y_abs, dtype) <= 1.0
    # and the first kernel on the same activations, within the same bound
    xq_d, t_d = cuda_fp8.quantize_per_token_fp8(x.to(DEV), kp)
    y_tile = cuda_fp8.fp4_fp8_gemm(xq_d, t_d, pack_fp4(codes).to(DEV), sexp.to(DEV), cscale.to(DEV), g, dtype)
    assert _within_tolerance(y, y_tile.float().cpu(), y_abs, dtype) <= 2.0


def test_runtime_layer_decodes_on_the_repacked_kernel_and_captures():
    """A method-made fp4-fp8 layer with LoRC, prepared as runtime.load does: M <= 64 runs the repacked
    kernel (one launch plus LoRC's quantizer), is captured in a CUDA graph, and equals the CPU path."""
    from qconvert.layouts.fp8 import FP8Linear
    from qconvert.methods.zeroquant_fp import ZeroQuantFPMethod

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(1024, 4096, generator=gen) * 0.02
    ql = ZeroQuantFPMethod({"base": "rtn", "lorc_rank": 8, "group_size": 128}).quantize_linear("l", w)
    cpu = FP8Linear(ql.layout, ql.tensors, None)
    gpu = FP8Linear(ql.layout, {k: v.to(DEV) for k, v in ql.tensors.items()}, None)
    gpu.check_cuda("l")
    gpu.prepare_cuda()
    x = (torch.randn(4, 4096, generator=gen) * 0.5).half().to(DEV)
    _on_prepared_copy_captured_and_close(gpu, cpu, x, graph=True)


def _on_prepared_copy_captured_and_close(gpu, cpu, x, graph: bool) -> None:
    """x runs on gpu's prepared copy; with ``graph`` a CUDA graph of the call replays it bit for bit;
    the output is within 2e-3 (relative norm) of the CPU path's."""
    assert gpu._on_repacked(x)
    y = gpu(x)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_graph = gpu(x)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, y_graph)
    y_ref = cpu(x.float().cpu())
    assert float((y.float().cpu() - y_ref).norm() / y_ref.norm()) < 2e-3


# ---- fp4-fp8 at M > 64: the weights widened to E4M3 (w4a8r_widen_zq), then torch._scaled_mm
ZQ_PREFILL_SHAPES = [(65, 4096, 4096, 128), (257, 14336, 4096, 128), (130, 4096, 14336, 128), (97, 13, 300, 96),
                     (1024, 1024, 4096, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,g", ZQ_PREFILL_SHAPES)
def test_widened_prefill_matches_reference(m, n, k, g, dtype):
    from qconvert_kernels.w4a8 import cuda as kcuda

    _needs_row_wise(dtype)
    x, codes, sexp, cscale, kp = fp4_case(m, n, k, g, dtype)
    if sexp.shape[1] >= 2:  # row 0 spans the 14 E4M3 holds: its widened values reach 2^-9 (subnormal) and 384
        sexp[0, 0], sexp[0, 1] = sexp[0].max() - 14, sexp[0].max()
    tensors = {"qweight": pack_fp4(codes), "sexp": sexp, "cscale": cscale, "shape": torch.tensor([n, k])}
    prep = kcuda.prepare("fp4-fp8", tensors, g, DEV)
    assert prep.prefills(dtype), kcuda.scaled_mm_outputs(DEV)
    w8 = kcuda.widen_zq(prep)
    w = codes_to_values(codes).double()
    pow2 = torch.ldexp(torch.ones(sexp.shape, dtype=torch.float64), sexp.double()).repeat_interleave(g, 1)
    assert torch.equal(w8.double().cpu()[:n, :kp] * prep.widen_cscale[:n].double().cpu()[:, None],
                       w * pow2 * cscale.double()[:, None])  # the widening is exact
    xq, t = cuda_fp8.quantize_per_token_fp8(x.to(DEV), prep.kq)
    y = kcuda.zq_prefill(xq, t, prep, dtype)
    assert y.shape == (m, n) and y.dtype == dtype
    xq_c, t_c = xq.cpu()[:, :kp], t.cpu()
    y_ref = ref8.fp4_fp8_gemm_widened(xq_c, t_c, ref8.weight_groups(codes_to_values(codes), g), sexp, cscale)
    y_abs = ref8.fp4_fp8_gemm(xq_c.float().abs().to(torch.float8_e4m3fn), t_c,
                              ref8.weight_groups(codes_to_values(codes).abs(), g), sexp, cscale)
    assert _within_tolerance(y, y_ref, y_abs, dtype) <= 1.0


def _loaded_as_runtime_loads(ql):
    """(a CPU layer, a GPU layer) of a method's output, the GPU one prepared from the host and its
    stored tensors kept there, then moved, as runtime.load does (asserted: they stayed)."""
    from qconvert.layouts.fp8 import FP8Linear

    cpu = FP8Linear(ql.layout, ql.tensors, None)
    gpu = FP8Linear(ql.layout, ql.tensors, None)
    gpu.check_cuda("l")
    gpu.prepare_cuda(DEV)
    gpu.keep_stored_on_host()
    gpu.to(DEV)
    assert gpu.qweight.device.type == "cpu"
    return cpu, gpu


def test_runtime_layer_prefills_on_the_widened_weights():
    """A method-made LoRC layer prepared and its stored tensors kept on the host, as runtime.load does:
    300 tokens take the widening and the FP8 GEMM, and equal the CPU path."""
    from qconvert.methods.zeroquant_fp import ZeroQuantFPMethod

    _needs_row_wise(torch.float16)
    _needs_row_wise(torch.bfloat16)  # the stored tensors stay on the host where both run on the copy
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(1024, 4096, generator=gen) * 0.02
    ql = ZeroQuantFPMethod({"base": "rtn", "lorc_rank": 8, "group_size": 128}).quantize_linear("l", w)
    cpu, gpu = _loaded_as_runtime_loads(ql)
    assert gpu._prepared.prefills(torch.float16)
    x = (torch.randn(300, 4096, generator=gen) * 0.5).half()
    y = gpu(x.to(DEV))
    y_ref = cpu(x.float())
    assert float((y.float().cpu() - y_ref).norm() / y_ref.norm()) < 2e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_lorc_at_decode_in_the_kernels(dtype):
    """LoRC's h kernel equals the lanes reference bit for bit (only float ops in a fixed order); the
    decode with LoRC's term in its epilogue is within the FP8 tolerance of the lanes reference."""
    from qconvert_kernels.w4a8 import cuda as kcuda

    m, n, k, g, r = 4, 4096, 14336, 128, 8
    x, codes, sexp, cscale, kp = fp4_case(m, n, k, g, dtype)
    gen = torch.Generator().manual_seed(8)
    u, v = (torch.randn(n, r, generator=gen) * 0.05).half(), (torch.randn(r, k, generator=gen) * 0.05).half()
    tensors = {"qweight": pack_fp4(codes), "sexp": sexp, "cscale": cscale, "shape": torch.tensor([n, k]),
               "lorc_u": u, "lorc_v": v}
    prep = kcuda.prepare("fp4-fp8", tensors, g, DEV)
    xq, t = ref8.quantize_per_token_fp8(x, kp)
    h_ref = ref8.lorc_h_lanes(xq, t, v)
    assert torch.equal(kcuda.lorc_h(x.to(DEV), prep).cpu(), h_ref)
    y = kcuda.linear(x.to(DEV), prep)
    w = codes_to_values(codes)
    bounds = kcuda.plan(m, prep, kcuda.device_sm_count(DEV)).split_bounds()
    y_ref = ref8.lorc_tail(ref8.fp4_fp8_gemm_split(xq, t, ref8.weight_groups(w, g), sexp, cscale, bounds), h_ref, u)
    y_abs = ref8.fp4_fp8_gemm(xq.float().abs().to(torch.float8_e4m3fn), t, ref8.weight_groups(w.abs(), g), sexp, cscale)
    assert _within_tolerance(y, y_ref, y_abs, dtype) <= 1.0


# ---- fp8-fp8 on torch._scaled_mm (every M): the same tolerance, Llama-3-8B shapes, odd N and M
FP8_SCALED_SHAPES = [(1, 4096, 4096), (1, 14336, 4096), (8, 4096, 14336), (64, 6144, 4096), (256, 4096, 4096),
                     (3, 13, 96), (130, 200, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", FP8_SCALED_SHAPES)
def test_fp8_fp8_scaled_matches_reference(m, n, k, dtype):
    _needs_row_wise(dtype)
    x, wq, wscale, kp = fp8_case(m, n, k, dtype)
    prep = cuda_fp8.prepare_fp8_fp8(wq, wscale, DEV)
    assert prep is not None and prep.runs(dtype), cuda_fp8.scaled_mm_outputs(DEV)
    xq, t = cuda_fp8.quantize_per_token_fp8(x.to(DEV), kp)
    y = cuda_fp8.fp8_fp8_scaled(xq, t, prep, dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    xq, t = xq.cpu(), t.cpu()
    y_ref = ref8.fp8_fp8_gemm(xq, t, wq, wscale)
    y_abs = ref8.fp8_fp8_gemm(xq.float().abs().to(torch.float8_e4m3fn), t, wq.float().abs().to(torch.float8_e4m3fn), wscale)
    assert _within_tolerance(y, y_ref, y_abs, dtype) <= 1.0


def test_runtime_fp8_layer_on_the_scaled_gemm_holds_its_weights_once_and_captures():
    """A method-made fp8-fp8 layer with LoRC prepared as runtime.load does (prepare on the GPU from
    the host, stored tensors kept on the host): decode and prefill run torch._scaled_mm, a CUDA
    graph replays the decode bit for bit, and both equal the CPU path within 2e-3."""
    from qconvert.methods.zeroquant_fp import ZeroQuantFPMethod

    _needs_row_wise(torch.float16)
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(1000, 4096, generator=gen) * 0.02
    ql = ZeroQuantFPMethod({"weight_format": "fp8", "base": "rtn", "lorc_rank": 4}).quantize_linear("l", w)
    cpu, gpu = _loaded_as_runtime_loads(ql)
    assert gpu._prepared.w8.is_cuda and gpu.lorc_u.is_cuda
    for m in (4, 300):
        x = (torch.randn(m, 4096, generator=gen) * 0.5).half().to(DEV)
        _on_prepared_copy_captured_and_close(gpu, cpu, x, graph=m == 4)


@pytest.mark.parametrize("layout,lorc_rank", [("fp8-fp8", 0), ("fp4-fp8", 0), ("fp4-fp8", 8)])
def test_fused_siblings_on_the_gpu_equal_each_member_alone(layout, lorc_rank):
    """Llama-3-8B's q/k/v (4096, 1024, 1024 rows of 4096) joined (runtime.fuse_siblings; with LoRC rank
    8 each, the zqfp-w4a8 preset): at decode (captured in a CUDA graph) and at 300 tokens one
    quantization and one GEMM give each member within 2e-3 of its own prepared layer."""
    from qconvert.layouts.fp8 import FP8Linear
    from qconvert.methods.zeroquant_fp import ZeroQuantFPMethod

    _needs_row_wise(torch.float16)
    gen = torch.Generator().manual_seed(7)
    params = {"weight_format": "fp8", "base": "rtn", "lorc_rank": 0} if layout == "fp8-fp8" else \
        {"base": "rtn", "lorc_rank": lorc_rank, "group_size": 128}
    qls = [ZeroQuantFPMethod(params).quantize_linear(f"l{i}", torch.randn(n, 4096, generator=gen) * 0.02)
           for i, n in enumerate((4096, 1024, 1024))]
    fused = [FP8Linear(q.layout, q.tensors, None) for q in qls]
    alone = [FP8Linear(q.layout, q.tensors, None) for q in qls]
    assert FP8Linear.fuse(fused)
    for mod in fused + alone:
        mod.prepare_cuda(DEV)
        mod.keep_stored_on_host()
        mod.to(DEV)
    for m in (4, 300):
        x = (torch.randn(m, 4096, generator=gen) * 0.5).half().to(DEV)
        ys = [mod(x) for mod in fused]
        if m == 4:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                ys_graph = [mod(x) for mod in fused]
            g.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(ys, ys_graph))
        for y, mod in zip(ys, alone):
            own = mod(x).float()
            assert float((y.float() - own).norm() / own.norm()) < 2e-3
    assert fused[0]._group.launches == 3
