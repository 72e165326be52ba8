"""ZeroQuant-FP fp8-fp8 on torch._scaled_mm (the row-wise FP8 GEMM) proven on the CPU: the same
launcher code and layer path a GPU load takes, with torch's CPU ``_scaled_mm`` standing in for
cuBLASLt / CUTLASS.  The GEMM sums over all of K in its own order, so it is held to the FP8 tests'
tolerance against the reference (|y - y_ref| <= 2^-9 |y|_abs + 1 ulp), and a wrong scale, row
padding or transposition is caught (its error is of the order of |y|_abs).  The GPU tests
(tests/test_kernels_fp8_gpu.py) run the same on cuBLASLt / CUTLASS."""

from __future__ import annotations

import pytest
import torch
from test_kernels_fp8_emulate import fp8_case

from helpers import needs_cpu_row_scaled_mm
from qconvert.layouts.fp8 import FP8Linear
from qconvert.methods.zeroquant_fp import ZeroQuantFPMethod
from qconvert_kernels.fp8 import cuda as cuda_fp8
from qconvert_kernels.fp8 import reference as ref8

DTYPES = [torch.float16, torch.bfloat16]
pytestmark = needs_cpu_row_scaled_mm()


def tolerance_ratio(y, xq, t, wq, wscale, dtype):
    """max |y - y_ref| / bound, the bound of tests/test_kernels_fp8_gpu.py."""
    y_ref = ref8.fp8_fp8_gemm(xq, t, wq, wscale)
    y_abs = ref8.fp8_fp8_gemm(xq.float().abs().to(torch.float8_e4m3fn), t, wq.float().abs().to(torch.float8_e4m3fn), wscale)
    bound = 2.0**-9 * y_abs + torch.finfo(dtype).eps * y_ref.abs() + torch.finfo(dtype).tiny
    return float(((y.float() - y_ref).abs() / bound).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 8, 576), (3, 13, 96), (70, 136, 640), (17, 576, 1000), (1, 4096, 256)])
def test_scaled_gemm_matches_the_reference(m, n, k, dtype):
    x, wq, wscale, kp = fp8_case(m, n, k, dtype)
    prep = cuda_fp8.prepare_fp8_fp8(wq, wscale, "cpu")
    assert prep is not None and prep.w8.shape == (-(-n // 16) * 16, kp) and prep.runs(dtype)
    assert not prep.w8[n:].view(torch.uint8).any() and not prep.wscale[n:].any()
    xq, t = ref8.quantize_per_token_fp8(x, kp)
    y = cuda_fp8.fp8_fp8_scaled(xq, t, prep, dtype)
    assert y.shape == (m, n) and y.dtype == dtype
    assert tolerance_ratio(y, xq, t, wq, wscale, dtype) <= 1.0


def test_scaled_gemm_catches_wrong_scales_and_padding():
    """The tolerance fails a layer whose row scales are shifted by one row, whose activation scale is
    dropped, or whose weight rows are taken in the wrong order: the check can fail."""
    x, wq, wscale, kp = fp8_case(5, 40, 320, torch.float16)
    xq, t = ref8.quantize_per_token_fp8(x, kp)
    prep = cuda_fp8.prepare_fp8_fp8(wq, wscale, "cpu")
    assert tolerance_ratio(cuda_fp8.fp8_fp8_scaled(xq, t, prep, torch.float16), xq, t, wq, wscale, torch.float16) <= 1.0
    shifted = cuda_fp8.prepare_fp8_fp8(wq, wscale, "cpu")
    shifted.wscale[:40] = torch.roll(wscale, 1)
    flipped = cuda_fp8.prepare_fp8_fp8(wq.flip(0), wscale, "cpu")
    for bad in (cuda_fp8.fp8_fp8_scaled(xq, t, shifted, torch.float16),
                cuda_fp8.fp8_fp8_scaled(xq, torch.ones_like(t), prep, torch.float16),
                cuda_fp8.fp8_fp8_scaled(xq, t, flipped, torch.float16)):
        assert tolerance_ratio(bad, xq, t, wq, wscale, torch.float16) > 10.0


def test_weights_shared_where_n_is_a_multiple_of_16_and_bad_input_refused():
    x, wq, wscale, kp = fp8_case(2, 32, 128, torch.float16)
    prep = cuda_fp8.prepare_fp8_fp8(wq, wscale, "cpu")
    assert prep.w8.data_ptr() == wq.data_ptr()  # no copy on the same device
    xq, t = ref8.quantize_per_token_fp8(x, kp)
    with pytest.raises(ValueError, match=r"xq must be float8_e4m3fn \[M, Kp\] = \[\*, 128\]"):
        cuda_fp8.fp8_fp8_scaled(xq[:, :64], t, prep, torch.float16)
    with pytest.raises(ValueError, match=r"t must be \[M\] = \[2\]"):
        cuda_fp8.fp8_fp8_scaled(xq, t[:1], prep, torch.float16)
    with pytest.raises(ValueError, match="Kp=100 must be a positive multiple of 64"):
        cuda_fp8.prepare_fp8_fp8(wq[:, :100], wscale, "cpu")
    with pytest.raises(ValueError, match=r"wscale must be \[N\] = \[32\]"):
        cuda_fp8.prepare_fp8_fp8(wq, wscale[:31], "cpu")
    prep.outs = {torch.float16: None, torch.bfloat16: torch.bfloat16}
    with pytest.raises(ValueError, match="no row-wise FP8 GEMM for torch.float16 output"):
        cuda_fp8.fp8_fp8_scaled(xq, t, prep, torch.float16)


def _layer(n=136, k=320, lorc_rank=3, seed=5):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    ql = ZeroQuantFPMethod({"weight_format": "fp8", "base": "rtn", "lorc_rank": lorc_rank}).quantize_linear("l", w)
    assert ql.layout == "fp8-fp8"
    return ql.tensors, gen


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_runs_every_m_on_the_scaled_gemm(monkeypatch, dtype):
    """A method-made fp8-fp8 layer with LoRC, prepared as a GPU load prepares it: decode and prefill
    sizes both run fp8_fp8_scaled (one torch._scaled_mm each), LoRC on the same E4M3 activations,
    within the tolerance of the CPU path; the stored tensors then stay on the host."""
    tensors, gen = _layer()
    lin = FP8Linear("fp8-fp8", tensors, None)
    cpu = FP8Linear("fp8-fp8", tensors, None)
    calls = []
    real = cuda_fp8.fp8_fp8_scaled
    monkeypatch.setattr(cuda_fp8, "fp8_fp8_scaled", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    x = (torch.randn(70, 320, generator=gen) * 0.5).to(dtype)
    assert not lin._on_repacked(x)
    lin.prepare_cuda("cpu")
    for m in (1, 7, 70):
        assert lin._on_repacked(x[:m])
        got = lin(x[:m].reshape(1, m, 320))
        assert got.shape == (1, m, 136) and got.dtype == dtype
        xq, t = ref8.quantize_per_token_fp8(x[:m], lin.kp)
        lorc = ref8.lorc_term(xq, t, lin.lorc_u, lin.lorc_v)
        want = ref8.fp8_fp8_gemm(xq, t, lin.qweight, lin.wscale) + lorc
        y_abs = ref8.fp8_fp8_gemm(xq.float().abs().to(torch.float8_e4m3fn), t, lin.qweight.float().abs().to(torch.float8_e4m3fn),
                                  lin.wscale) + lorc.abs()
        bound = 2.0**-9 * y_abs + 2 * torch.finfo(dtype).eps * want.abs() + torch.finfo(dtype).tiny
        assert float(((got.reshape(m, 136).float() - want).abs() / bound).max()) <= 1.0
        ref_path = cpu(x[:m].float())
        assert float((got.reshape(m, 136).float() - ref_path).norm() / ref_path.norm()) < 1e-2
    assert calls == [1, 7, 70]
    held = {name: getattr(lin, name) for name in ("qweight", "wscale")}
    lin.keep_stored_on_host()
    lin.to(torch.float64)
    assert all(getattr(lin, name) is held[name] for name in held) and lin.lorc_u.dtype == torch.float64


def test_layer_without_a_row_wise_gemm_stays_on_the_first_kernel(monkeypatch):
    """Where torch._scaled_mm takes no row-wise FP8 GEMM, prepare_cuda leaves the layer unprepared
    (the GPU then runs fp8_gemm.cu's kernel), the probe is not kept, and nothing is held on the host."""
    tensors, gen = _layer(lorc_rank=0)
    lin = FP8Linear("fp8-fp8", tensors, None)

    def refuse(*a, **kw):
        raise RuntimeError("rowwise scaling is not supported here")

    probes = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: probes.append(1) or refuse())
    monkeypatch.setattr(cuda_fp8, "_SCALED_MM_OUT", {})
    lin.prepare_cuda("cpu")
    assert lin._prepared is None and cuda_fp8._SCALED_MM_OUT == {} and probes
    tried = len(probes)
    lin.prepare_cuda("cpu")  # the device failed once: not probed again (a forward on a GPU calls this)
    assert len(probes) == tried
    x = torch.randn(3, 320, generator=gen).half()
    assert not lin._on_repacked(x)
    lin.keep_stored_on_host()
    assert not lin._stored_on_host


def test_smollm2_layers_on_the_scaled_gemm_agree_with_the_cpu_path(smollm2):
    """SmolLM2's first block quantized zqfp-w8a8 (the real weights): every fp8-fp8 linear prepared
    for torch._scaled_mm gives, for a prompt's hidden states, the CPU path's output within the
    tolerance above (relative error of the whole output < 1e-2 in fp16)."""
    model = smollm2.load_model()
    layer = model.model.layers[0]
    method = ZeroQuantFPMethod({"weight_format": "fp8", "base": "rtn", "lorc_rank": 0})
    gen = torch.Generator().manual_seed(0)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"):
        w = layer.get_submodule(name).weight.detach()
        ql = method.quantize_linear(name, w)
        lin = FP8Linear(ql.layout, ql.tensors, None)
        x = torch.randn(9, w.shape[1], generator=gen)
        want = lin(x)
        lin.prepare_cuda("cpu")
        got = lin(x.half()).float()
        assert float((got - want).norm() / want.norm()) < 1e-2, name


def test_a_torch_whose_row_wise_gemm_outputs_bf16_only(monkeypatch):
    """fp16 activations without a row-wise FP8 GEMM for their output (torch's CUTLASS path before
    fp16 outputs): the layer is still prepared and holds its stored tensors on the host; bf16 runs
    the GEMM, fp16 fp8_gemm.cu's kernel on the prepared copy's rows (here on the fp8 emulator), both
    the reference's within tolerance."""
    from qconvert_kernels.fp8 import emulate as emulate8

    monkeypatch.setattr(cuda_fp8, "_SCALED_MM_OUT", {"cpu": {torch.float16: None, torch.bfloat16: torch.bfloat16}})
    monkeypatch.setattr(cuda_fp8, "_capability", lambda index=0: 90)
    tensors, gen = _layer(lorc_rank=0)
    lin = FP8Linear("fp8-fp8", tensors, None)
    lin.prepare_cuda("cpu")
    lin.keep_stored_on_host()
    assert lin._stored_on_host and lin._prepared.runs(torch.bfloat16) and not lin._prepared.runs(torch.float16)
    x = (torch.randn(5, 320, generator=gen) * 0.5).half()
    assert lin._on_repacked(x.bfloat16()) and not lin._on_repacked(x)
    w, ws = lin._fp8_weights(torch.device("cpu"))
    assert w.data_ptr() == lin._prepared.w8.data_ptr() and w.shape == lin.qweight.shape
    xq, t = ref8.quantize_per_token_fp8(x, lin.kp)
    with emulate8.emulating():
        y = cuda_fp8.fp8_fp8_gemm(xq, t, w, ws, torch.float16)
    assert tolerance_ratio(y, xq, t, lin.qweight, lin.wscale, torch.float16) <= 1.0


def test_a_copy_on_another_device_is_made_again_on_the_new_one():
    """A module moved between devices after its load (a GPU model moved to another GPU): the next
    prepare (each forward on a GPU asks) makes the copy on the input's device; the same device keeps it."""
    import dataclasses

    tensors, _ = _layer(lorc_rank=0)
    lin = FP8Linear("fp8-fp8", tensors, None)
    lin.prepare_cuda("cpu")
    first = lin._prepared
    lin.prepare_cuda("cpu")
    assert lin._prepared is first
    lin._prepared = dataclasses.replace(first, w8=first.w8.to("meta"))  # as if made on another device
    lin.prepare_cuda("cpu")
    assert lin._prepared is not first and lin._prepared.w8.device.type == "cpu"
    assert torch.equal(lin._prepared.w8.view(torch.uint8), first.w8.view(torch.uint8))
