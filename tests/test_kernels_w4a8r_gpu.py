"""The repacked W4A8 kernels (``cuda.prepare`` / ``cuda.linear``) on a GPU against the torch reference,
bit for bit (needs cupy and an sm_80+ GPU; the same cases run on the CPU emulator in
tests/test_kernels_w4a8_emulate.py).  Also: CUDA-graph capture and replay, the workspace back at
zero, subnormal / huge-amax rows, the overflow-adversarial input, Llama-3-8B shapes, and the SASS
of the module the launcher loaded on this device (no FTZ)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert_kernels import compile as kc  # noqa: E402
from qconvert_kernels import launch  # noqa: E402
from qconvert_kernels.w4a8 import cuda  # noqa: E402
from qconvert_kernels.w4a8 import reference as ref  # noqa: E402

if not cuda.available():
    pytest.skip("no CUDA device usable by cupy (sm_80+)", allow_module_level=True)

from test_kernels_w4a8_emulate import (  # noqa: E402
    DECODE_CASES, PREFILL_BM64_CASES, PREFILL_CASES, _subnormal_case, activations, make_layer)

DEV = torch.device("cuda")
SMS = launch.sm_count(0)


def _to(t, dev):
    return {k: v.to(dev) for k, v in t.items()}


def run(m, n, k, g, layout, dtype=torch.float16, x=None, tensors=None, prefill_bm=cuda.P_BM):
    seed = m * 1_000_003 + n * 1009 + k * 7 + g
    tensors = tensors if tensors is not None else make_layer(n, k, g, layout, seed)
    x = x if x is not None else activations(m, k, dtype, seed)
    prep = cuda.prepare(layout, _to(tensors, DEV), g, DEV)
    out = cuda.linear(x.to(DEV), prep, return_acc=layout == "w4a8-is", prefill_bm=prefill_bm)
    torch.cuda.synchronize()
    y, acc = out if layout == "w4a8-is" else (out, None)
    pl = cuda.plan(m, prep, SMS, prefill_bm, cuda.prefill_ctas(DEV, prefill_bm))
    want = ref.linear_reference(x, layout, tensors, g, bounds=pl.split_bounds(), return_acc=layout == "w4a8-is")
    if layout == "w4a8-is":
        want, acc_ref = want
        assert torch.equal(acc.cpu(), acc_ref)
    assert torch.equal(y.cpu().view(torch.int16), want.view(torch.int16)), (m, n, k, g, layout, pl)
    assert not prep.workspace.any()
    return pl


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,g,layout,sms", DECODE_CASES + PREFILL_CASES)
def test_cases_bit_exact(m, n, k, g, layout, sms, dtype):
    run(m, n, k, g, layout, dtype)


@pytest.mark.parametrize("m,n,k,g,layout,sms", PREFILL_BM64_CASES)
def test_bm64_prefill_cases_bit_exact(m, n, k, g, layout, sms):
    """The 64-token prefill tiles (two CTAs per SM), the emulator's cases, and q/o at M = 65 / 256 / 300."""
    assert run(m, n, k, g, layout, prefill_bm=64).kernel.endswith("_bm64")


@pytest.mark.parametrize("m", [65, 256, 300])
def test_bm64_prefill_llama_q_proj_shape(m):
    run(m, 4096, 4096, 128, "w4a8-is", prefill_bm=64)


@pytest.mark.parametrize("layout", ["w4a8-is", "w4a8-fs"])
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 33, 64, 65, 130, 256])
def test_llama_q_proj_shape(m, layout):
    run(m, 4096, 4096, 128, layout)


@pytest.mark.parametrize("m", [1, 16, 300])
def test_down_proj_shape(m):
    run(m, 4096, 14336, 128, "w4a8-is")


@pytest.mark.parametrize("m", [3, 130])
def test_subnormal_and_huge_rows(m):
    x = _subnormal_case()
    if m > 3:
        x = torch.cat([x, torch.randn((m - 3, 256)).to(torch.bfloat16)])
    t = make_layer(136, 256, 64, "w4a8-is", 3)
    t["cscale"] = torch.full((136,), 2.0**-100)
    run(m, 136, 256, 64, "w4a8-is", torch.bfloat16, x=x, tensors=t)


def test_overflow_adversarial_input():
    from qconvert.formats.packing import unpack_int4
    from qconvert.methods.integer_scale import IntegerScaleMethod

    gen = torch.Generator().manual_seed(0)
    w = torch.randn((256, 4096), generator=gen) * 0.02
    ql = IntegerScaleMethod({"group_size": 128}).quantize_linear("adversarial", w)
    tens, worst, bound = dict(ql.tensors), ql.info["worst_channel"], ql.info["bound"]
    sign = torch.sign(unpack_int4(tens["qweight"])[worst].float())
    for rows in (4, 200):
        x = torch.cat([torch.stack([sign, -sign]), torch.randn((rows - 2, 4096), generator=gen)]).half()
        prep = cuda.prepare("w4a8-is", _to(tens, DEV), 128, DEV)
        y, acc = cuda.linear(x.to(DEV), prep, return_acc=True)
        acc = acc.cpu()
        assert int(acc[0, worst]) == bound and int(acc[1, worst]) == -bound
        want, acc_ref = ref.linear_reference(x, "w4a8-is", tens, 128, return_acc=True)
        assert torch.equal(acc, acc_ref) and torch.equal(y.cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("m", [1, 16, 200])
def test_cuda_graph_capture_and_replay(m):
    """linear is capturable (no host sync); replays on new inputs give the reference's bits and leave
    the workspace at zero."""
    t = make_layer(4096, 4096, 128, "w4a8-is", 5)
    prep = cuda.prepare("w4a8-is", _to(t, DEV), 128, DEV)
    x_static = activations(m, 4096, torch.float16, 1).to(DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda.linear(x_static, prep)  # warm-up on the capture stream (module load, allocator)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = cuda.linear(x_static, prep)
    for seed in (2, 3):
        x = activations(m, 4096, torch.float16, seed)
        x_static.copy_(x.to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        want = ref.linear_reference(x, "w4a8-is", t, 128)
        assert torch.equal(y_static.cpu().view(torch.int16), want.view(torch.int16))
        assert not prep.workspace.any()


def test_loaded_module_has_no_ftz_and_its_imma():
    cap = launch.capability(0)
    path = launch.build(cuda.SOURCE_R, launch.target_for(cap))
    if kc.cuobjdump_path() is None or path.suffix != ".cubin":
        pytest.skip("no cuobjdump, or a PTX build for this device")
    per_kernel = kc.kernel_sass(kc.sass(path))
    for name, text in per_kernel.items():
        ops = kc.opcodes(text)
        assert not [op for op in ops if ".FTZ" in op], name
        if "decode" in name or "prefill" in name:
            assert any(op.startswith("IMMA") for op in ops), name
