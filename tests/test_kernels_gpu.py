"""The CUDA W4A8 kernels against the bit-exact torch reference (needs cupy and an sm_80+ GPU).

int32 accumulators and the quantizer must match exactly; fp16 / bf16 outputs within 1 ulp
(they are the reference's float32 result rounded to nearest, so they should match exactly).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert.formats.packing import pack_int4, unpack_int4  # noqa: E402
from qconvert_kernels.w4a8 import cuda as kcuda  # noqa: E402
from qconvert_kernels.w4a8 import reference as ref  # noqa: E402

if not kcuda.available():
    pytest.skip("no CUDA device usable by cupy (sm_80+)", allow_module_level=True)

DEV = torch.device("cuda")
DTYPES = [torch.float16, torch.bfloat16]
# (M, N, K, g): odd M (1, 3, 17, 130), K = 576 padded to 640 by g = 128, K = 4096, N in
# {8, 192, 576}, every supported g, Kp % 64 == 32 (a half-empty last K stage), odd N.
SHAPES = [
    (1, 8, 576, 128),
    (3, 192, 576, 128),
    (17, 576, 4096, 128),
    (130, 192, 4096, 128),
    (1, 576, 4096, 128),
    (130, 8, 576, 128),
    (17, 192, 4096, 32),
    (3, 576, 1000, 64),
    (130, 192, 4096, 256),
    (17, 8, 96, 32),
    (3, 13, 300, 96),
    (257, 72, 256, 64),
]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their 16-bit float type (monotonic bit keys)."""

    def key(x):
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (key(a) - key(b)).abs()


def _weights(n: int, k: int, g: int, gen: torch.Generator):
    kp = -(-k // g) * g
    q = torch.randint(-8, 8, (n, kp), generator=gen, dtype=torch.int8)
    q[:, k:] = 0
    return q, pack_int4(q), kp


def _activations(m: int, k: int, dtype, gen: torch.Generator):
    x = (torch.randn((m, k), generator=gen) * torch.rand((m, 1), generator=gen) * 4).to(dtype)
    if m > 2:
        x[1] = 0  # an all-zero token: t = 0, xq = 0
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 576), (3, 4096), (17, 1000), (130, 96), (4, 1)])
def test_quantizer_bit_exact(m, k, dtype):
    gen = torch.Generator().manual_seed(m * 7919 + k)
    x = _activations(m, k, dtype, gen)
    kp = -(-k // 128) * 128
    xq, t = kcuda.quantize_per_token_int8(x.to(DEV), kp)
    xq_ref, t_ref = ref.quantize_per_token_int8(x, kp)
    assert torch.equal(xq.cpu(), xq_ref)
    assert torch.equal(t.cpu(), t_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,g", SHAPES)
def test_is_gemm_matches_reference(m, n, k, g, dtype):
    gen = torch.Generator().manual_seed(m * 1_000_003 + n * 1009 + k + g)
    q, qw, kp = _weights(n, k, g, gen)
    n_groups = kp // g
    iscale = torch.randint(1, 256, (n, n_groups), generator=gen, dtype=torch.int32)  # |A| < 2**31
    cscale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    alpha_log2 = 8
    x = _activations(m, k, dtype, gen)
    xq, t = kcuda.quantize_per_token_int8(x.to(DEV), kp)
    y, acc = kcuda.w4a8_is_gemm(xq, t, qw.to(DEV), iscale.to(DEV), cscale.to(DEV), alpha_log2, g, dtype, return_acc=True)
    y_ref, acc_ref = ref.w4a8_is_gemm(xq.cpu(), t.cpu(), q, iscale, cscale, alpha_log2, g, return_acc=True)
    assert torch.equal(acc.cpu(), acc_ref)
    assert y.dtype == dtype and y.shape == (m, n)
    assert int(_ulps(y.cpu(), y_ref.to(dtype)).max()) <= 1
    y2 = kcuda.w4a8_is_gemm(xq, t, qw.to(DEV), iscale.to(DEV), cscale.to(DEV), alpha_log2, g, dtype)
    assert torch.equal(y2, y)  # the debug accumulator does not change y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,g", SHAPES)
def test_fs_gemm_matches_reference(m, n, k, g, dtype):
    gen = torch.Generator().manual_seed(m * 999_983 + n * 1013 + k + g)
    q, qw, kp = _weights(n, k, g, gen)
    scales = (torch.rand((n, kp // g), generator=gen) * 0.02 + 1e-4).half()
    x = _activations(m, k, dtype, gen)
    xq, t = kcuda.quantize_per_token_int8(x.to(DEV), kp)
    y = kcuda.w4a8_fs_gemm(xq, t, qw.to(DEV), scales.to(DEV), g, dtype)
    y_ref = ref.w4a8_fs_gemm(xq.cpu(), t.cpu(), q, scales, g)
    assert y.dtype == dtype and y.shape == (m, n)
    assert int(_ulps(y.cpu(), y_ref.to(dtype)).max()) <= 1


def test_is_gemm_reaches_the_overflow_bound_exactly():
    """x = 127 * sign(q[worst]) drives A[worst] to the converter's bound (close to 2**31 - 1)."""
    from qconvert.methods.integer_scale import IntegerScaleMethod

    gen = torch.Generator().manual_seed(0)
    w = torch.randn((256, 4096), generator=gen) * 0.02
    ql = IntegerScaleMethod({"group_size": 128}).quantize_linear("adversarial", w)
    info, tens = ql.info, ql.tensors
    worst, bound = info["worst_channel"], info["bound"]
    q = unpack_int4(tens["qweight"])
    xq = torch.stack([127 * torch.sign(q[worst].float()), -127 * torch.sign(q[worst].float())]).to(torch.int8)
    xq = torch.cat([xq, torch.randint(-127, 128, (3, q.shape[1]), generator=gen, dtype=torch.int8)])
    t = torch.full((xq.shape[0],), 1.0 / 127)
    a = int(tens["alpha_log2"][0])
    y, acc = kcuda.w4a8_is_gemm(xq.to(DEV), t.to(DEV), tens["qweight"].to(DEV), tens["iscale"].to(DEV), tens["cscale"].to(DEV),
                                a, 128, torch.float16, return_acc=True)
    acc = acc.cpu()
    assert int(acc[0, worst]) == bound and int(acc[1, worst]) == -bound
    _, acc_ref = ref.w4a8_is_gemm(xq, t, q, tens["iscale"], tens["cscale"], a, 128, return_acc=True)
    assert torch.equal(acc, acc_ref)
    assert bound <= 2**31 - 1


def test_empty_and_validation():
    qw = torch.zeros((8, 64), dtype=torch.uint8, device=DEV)
    xq = torch.zeros((0, 128), dtype=torch.int8, device=DEV)
    y = kcuda.w4a8_is_gemm(xq, torch.zeros(0, device=DEV), qw, torch.ones((8, 1), dtype=torch.int32, device=DEV),
                           torch.ones(8, device=DEV), 0, 128, torch.float16)
    assert y.shape == (0, 8)
    with pytest.raises(ValueError, match=r"M=0, N=8, K=128, g=48"):
        kcuda.w4a8_fs_gemm(xq, torch.zeros(0, device=DEV), qw, torch.ones((8, 1), dtype=torch.float16, device=DEV), 48, torch.float16)


# ---------------------------------------------------------------------------------------------
# the GPU runtime and `qconvert bench` on the device


@pytest.mark.parametrize("dtype", DTYPES)
def test_runtime_cuda_layers_equal_the_cpu_reference(tiny_rtn_out, dtype):
    from qconvert.layouts.int4 import W4A8Linear
    from qconvert.runtime import load

    cpu = load(tiny_rtn_out, dtype=torch.float32)
    gpu = load(tiny_rtn_out, device="cuda", dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    layers = {n: m for n, m in cpu.named_modules() if isinstance(m, W4A8Linear)}
    assert layers
    # the kernels read the repacked copy on the GPU: the stored packed form stays in host memory
    assert all(t.device.type == "cpu" for n in layers for t in (gpu.get_submodule(n).qweight, gpu.get_submodule(n).iscale,
                                                                  gpu.get_submodule(n).cscale))
    assert gpu.get_input_embeddings().weight.is_cuda
    for name, layer in layers.items():
        x = torch.randn((2, 5, layer.in_features), generator=gen).to(dtype)
        y_ref = layer(x.float()).to(dtype)  # the reference: float32 result, rounded once
        y = gpu.get_submodule(name)(x.to(DEV))
        assert y.dtype == dtype and y.shape == y_ref.shape
        assert int(_ulps(y.cpu().reshape(-1, y.shape[-1]), y_ref.reshape(-1, y.shape[-1])).max()) <= 1, name
    ids = torch.arange(12)[None]
    lc, lg = cpu(ids).logits.float(), gpu(ids.to(DEV)).logits.float().cpu()
    assert (lc.argmax(-1) == lg.argmax(-1)).float().mean() >= 0.9
    assert float((lc - lg).abs().max()) < 0.05 * float(lc.abs().max()) + 0.05


def test_bench_kernel_rows_and_synthetic_on_gpu():
    from qconvert import bench as b

    rows = b.kernel_rows("o_proj", 576, 576, 16, DEV, runs=50, warmup=2, reps=4)
    assert [r["kernel"] for r in rows] == ["cublas-fp16", "w4a8-is", "w4a8-fs"]
    assert all(r["us"] > 0 for r in rows) and rows[1]["is_vs_fs"] > 0
    assert all("roofline_frac" in r for r in rows)
    res = b.synthetic_bench("smollm2-135m", device="cuda", layers=1, prefill=64, new_tokens=4, batches=(1, 2), repeats=1)
    assert res["runtime"] == "cuda-kernels" and res["speedup"]["decode_batch2"] > 0
