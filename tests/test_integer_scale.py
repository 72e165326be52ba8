"""Integer Scale math: the α choice, the overflow bound, and the runtime against float64."""

import numpy as np
import pytest
import torch

from qconvert.methods.integer_scale import (
    INT32_MAX,
    IntegerScaleMethod,
    choose_alpha,
    group_abs_sums,
    integer_scales,
    overflow_bound,
)
from qconvert.layouts.int4 import W4A8Linear
from qconvert_kernels.w4a8 import reference as ref


def _method(**kw):
    return IntegerScaleMethod({"group_size": 128, **kw})


def _decode_int4_numpy(packed: np.ndarray) -> np.ndarray:
    """Independent nibble decoding (docs/format.md): low nibble = even column, two's complement."""
    lo = (packed & 0x0F).astype(np.int64)
    hi = (packed >> 4).astype(np.int64)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int64)
    out[:, 0::2], out[:, 1::2] = lo, hi
    return np.where(out >= 8, out - 16, out)


def _float64_reference(x: np.ndarray, t: dict) -> tuple[np.ndarray, np.ndarray]:
    """y = t_m * c_n / 2^a * sum_j s_nj * sum_{k in j} x_mk q_nk, evaluated in float64 / int64."""
    q = _decode_int4_numpy(t["qweight"].numpy())
    n, kp = q.shape
    s = t["iscale"].numpy().astype(np.int64)
    g = kp // s.shape[1]
    xf = x.astype(np.float32)
    amax = np.abs(xf).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, (np.float32(1) / amax).astype(np.float32) * np.float32(127), np.float32(0)).astype(np.float32)
    xq = np.clip(np.rint(xf * inv[:, None]), -127, 127).astype(np.int64)
    xq = np.pad(xq, ((0, 0), (0, kp - xq.shape[1])))
    acc = np.zeros((x.shape[0], n), dtype=np.int64)
    for j in range(s.shape[1]):
        acc += (xq[:, j * g : (j + 1) * g] @ q[:, j * g : (j + 1) * g].T) * s[:, j][None, :]
    scale = (amax.astype(np.float64) / 127)[:, None] * t["cscale"].numpy().astype(np.float64)[None, :] / 2.0 ** int(t["alpha_log2"][0])
    return acc, acc * scale


@pytest.mark.parametrize("m, n, k, g", [(1, 8, 576, 128), (7, 33, 300, 64), (5, 16, 128, 128), (3, 12, 1000, 32)])
def test_runtime_equals_independent_float64(m, n, k, g):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[0, 3] = 0.5  # an outlier weight
    ql = _method(group_size=g).quantize_linear("layer", w)
    lin = W4A8Linear(ql.layout, ql.tensors, None)
    x = torch.randn(m, k, generator=gen)
    x[0, 5] = 40.0  # an outlier activation
    y = lin(x)
    xq, tok = ref.quantize_per_token_int8(x, lin.qweight.shape[1] * 2)
    _, acc = ref.w4a8_is_gemm(xq, tok, lin.weights_int8(), lin.iscale, lin.cscale, lin.alpha_log2, g, return_acc=True)
    acc64, y64 = _float64_reference(x.numpy(), ql.tensors)
    assert np.array_equal(acc.numpy().astype(np.int64), acc64), "int32 accumulators must be exact"
    np.testing.assert_allclose(y.numpy(), y64, rtol=2e-6, atol=1e-7)
    # and the quantized layer approximates the float layer
    err = (y - x @ w.T).norm() / (x @ w.T).norm()
    assert err < 0.2


def test_alpha_is_the_largest_that_cannot_overflow():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 4096, generator=gen)
    ql = _method().quantize_linear("l", w)
    q = ql.tensors["qweight"]
    from qconvert.formats.packing import unpack_int4

    sums = group_abs_sums(unpack_int4(q), 128)
    a = ql.info["alpha_log2"]
    assert int(overflow_bound(ql.tensors["iscale"], sums).max()) <= INT32_MAX
    s_hat_next, _ = integer_scales(_scales_of(w, 128), a + 1)
    assert int(overflow_bound(s_hat_next, sums).max()) > INT32_MAX, "α could have been doubled"
    assert int(ql.tensors["iscale"].min()) >= 1, "no group may vanish"
    assert 0 < ql.info["headroom_bits"] < 1.01


def _scales_of(w, g):
    from qconvert.solvers.rtn import quantize_groups_symmetric

    return quantize_groups_symmetric(w, 4, g).scales


def test_choose_alpha_respects_the_cap_and_refuses_impossible_layers():
    scales = torch.full((2, 4), 0.01)
    sums = torch.full((2, 4), 10, dtype=torch.int64)
    a, s_hat, _, bound = choose_alpha(scales, sums, max_alpha_log2=5)
    assert a == 5 and int(s_hat.max()) == 32 and int(bound.max()) == 127 * 32 * 40
    from qconvert.errors import QConvertError

    with pytest.raises(QConvertError, match="overflow"):
        choose_alpha(scales, torch.full((2, 4), 2**30, dtype=torch.int64), 30)


def test_adversarial_input_on_real_smollm2_layers(smollm2):
    """x = 127·sign(q) for the channel with the least headroom reaches the bound exactly, in int32."""
    method = _method()
    names = [f"model.layers.{i}.{p}" for i in (0, 14, 29) for p in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    for name in names:
        ql = method.quantize_linear(name, smollm2.get(f"{name}.weight"))
        lin = W4A8Linear(ql.layout, ql.tensors, None)
        q = lin.weights_int8()
        worst = ql.info["worst_channel"]
        xq = (127 * torch.sign(q[worst].to(torch.int32))).to(torch.int8)[None, :]
        _, acc = ref.w4a8_is_gemm(xq, torch.ones(1), q, lin.iscale, lin.cscale, lin.alpha_log2, 128, return_acc=True)
        assert int(acc[0, worst]) == ql.info["bound"] <= INT32_MAX, name
        # the exact int64 value of every output equals the int32 one: nothing wrapped
        acc64, _ = _float64_reference(np.sign(q.numpy().astype(np.float64))[worst][None, :lin.in_features] * 127, ql.tensors)
        assert np.array_equal(acc.numpy().astype(np.int64), acc64), name


def test_zero_points_are_for_weight_only_int4(tmp_path):
    """symmetric = false is refused, in one line that names the fix, where the W4A8 kernels would
    have to take it; accepted for weight-only (and validated as a boolean)."""
    from qconvert.errors import QConvertError

    with pytest.raises(QConvertError, match="zero points .* are for weight-only int4"):
        _method(symmetric=False)
    with pytest.raises(QConvertError, match="must be true or false"):
        _method(act_bits=16, scales="float", symmetric="no")
    m = _method(act_bits=16, scales="float", symmetric=False)
    assert m.describe()["weights"]["symmetric"] is False
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.01
    ql = m.quantize_linear("x", w)
    assert ql.layout == "w4a16-zp" and set(ql.tensors) == {"qweight", "shape", "scales", "zeros"}

