"""ZeroQuant-FP: FP4 / FP8 codebooks and packing, power-of-two group scales, GPTQ on the FP4
grid, LoRC, the CPU layouts against the reference, and the presets end to end on a tiny Llama."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from click.testing import CliRunner

from helpers import quantize_tiny
from qconvert.cli import cli
from qconvert.errors import QConvertError
from qconvert.formats.fp4 import codes_to_values, levels_to_codes, pack_fp4, round_e2m1, unpack_fp4, values_to_codes
from qconvert.solvers.gptq import relative_output_error
from qconvert.methods.zeroquant_fp import (FP4Grid, ZeroQuantFPMethod, fp4_dequantize, fp4_rtn, row_scales,
                                           search_row_scales)
from qconvert.layouts.fp8 import FP8Linear
from qconvert_kernels.fp8 import reference as ref8

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _problem(n=96, k=256, rows=2048, seed=0):
    """Correlated inputs with uneven channel scales (as tests/test_gptq.py), and their Hessian."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(rows, k, generator=g) @ mix) * torch.linspace(0.05, 4.0, k)
    w = torch.randn(n, k, generator=g) * 0.05
    return w, 2 * x.T @ x / rows, x


# ------------------------------------------------------------------ codebooks and packing


def test_e2m1_codebook_rounding_ties_to_even_and_saturates():
    vals = torch.tensor(E2M1 + [-v for v in E2M1])
    assert torch.equal(round_e2m1(vals), vals)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert round_e2m1(mids).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # the even code (m = 0) each time
    assert round_e2m1(-mids).tolist() == [0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    assert round_e2m1(torch.tensor([6.9, 100.0, -7.0])).tolist() == [6.0, 6.0, -6.0]
    x = torch.linspace(-8, 8, 20001)
    nearest = torch.tensor(E2M1 + [-v for v in E2M1])[(x[:, None] - torch.tensor(E2M1 + [-v for v in E2M1])).abs().argmin(1)]
    assert ((round_e2m1(x) - x).abs() <= (nearest - x).abs() + 1e-7).all()
    assert not torch.signbit(round_e2m1(torch.tensor([-0.1]))).any()  # zero is never -0


def test_e2m1_codes_round_trip_and_bit_layout():
    codes = torch.arange(16, dtype=torch.uint8)
    values = codes_to_values(codes)
    assert values[:8].tolist() == E2M1 and values[8:].tolist() == [-v for v in E2M1]
    for c in range(16):  # s e e m: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0
        s, e, m = c >> 3, (c >> 1) & 3, c & 1
        mag = (2.0 ** (e - 1)) * (1 + m / 2) if e else m * 0.5
        assert float(values[c]) == (-mag if s else mag)
    back = values_to_codes(values)
    assert torch.equal(back[codes != 8], codes[codes != 8]) and int(back[8]) == 0
    assert torch.equal(levels_to_codes(torch.tensor([0, 1, -1, 12, -12, 6], dtype=torch.int8)),
                       torch.tensor([0, 1, 9, 7, 15, 5], dtype=torch.uint8))
    with pytest.raises(ValueError, match="twice an E2M1 value"):
        levels_to_codes(torch.tensor([5], dtype=torch.int8))


def test_fp4_packing_round_trip_odd_shape():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (831, 546), generator=gen, dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.shape == (831, 273) and packed.dtype == torch.uint8
    assert torch.equal(unpack_fp4(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)  # low nibble = even column
    with pytest.raises(ValueError):
        pack_fp4(codes[:, :3])


def test_e2m1_widens_to_e4m3_by_exponent_rebias():
    codes = torch.arange(16, dtype=torch.uint8)
    fp8 = ref8.e2m1_to_e4m3_bits(codes).view(torch.float8_e4m3fn).float()
    assert torch.equal(fp8.abs(), codes_to_values(codes).abs()) and torch.equal(fp8, codes_to_values(codes))


def _e4m3_values() -> list[float]:
    """All non-negative finite E4M3 values, from the bit definition (bias 7, no inf, 0x7F NaN)."""
    out = []
    for b in range(0x7F):
        e, m = b >> 3, b & 7
        out.append(m * 2.0**-9 if e == 0 else 2.0 ** (e - 7) * (1 + m / 8))
    return out


def test_torch_e4m3_conversion_rounds_to_nearest_even_and_saturates():
    """What the reference relies on (and the kernel's cvt.rn.satfinite does): RNE, subnormals
    included, and saturation at 448 once the reference has clamped."""
    vals = _e4m3_values()
    assert vals[-1] == 448.0
    t = torch.tensor(vals)
    assert torch.equal(t.to(torch.float8_e4m3fn).float(), t)  # exact values are kept
    mids = torch.tensor([(a + b) / 2 for a, b in zip(vals, vals[1:])])
    got = mids.to(torch.float8_e4m3fn).view(torch.uint8).int()
    lo = torch.arange(len(vals) - 1)
    even = torch.where(lo % 2 == 0, lo, lo + 1)  # the neighbour whose mantissa's last bit is 0
    assert torch.equal(got, even.int())
    assert torch.equal((-mids).to(torch.float8_e4m3fn).float(), -mids.to(torch.float8_e4m3fn).float())
    # just above / below a midpoint goes to the nearer value
    up = torch.tensor([struct.unpack("f", struct.pack("f", float(m)))[0] for m in mids]).nextafter(torch.tensor(1e9))
    assert torch.equal(up.to(torch.float8_e4m3fn).view(torch.uint8).int(), lo.int() + 1)
    assert ref8.to_e4m3(torch.tensor([460.0, 1e6, -1e30])).float().tolist() == [448.0, 448.0, -448.0]


def test_per_token_fp8_quantizer():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 50, generator=gen) * torch.rand(7, 1, generator=gen) * 10
    x[3] = 0
    xq, t = ref8.quantize_per_token_fp8(x, 64)
    assert xq.dtype == torch.float8_e4m3fn and xq.shape == (7, 64) and t.dtype == torch.float32
    assert torch.equal(t, x.abs().amax(-1) / 448)
    assert (xq.float()[:, 50:] == 0).all() and (xq.float()[3] == 0).all() and float(t[3]) == 0
    assert torch.equal(xq.float().abs().amax(-1)[[0, 1, 2, 4, 5, 6]], torch.full((6,), 448.0))  # the extreme lands on 448
    rel = (xq.float()[:, :50] * t[:, None] - x).abs() / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert float(rel.max()) <= 2.0**-4 * 1.01  # 3 mantissa bits: half a step of 2^-3 relative
    fq = ZeroQuantFPMethod({}).activation_fake_quant(x[None])[0]
    assert torch.equal(fq, xq.float()[:, :50] * t[:, None])


# ------------------------------------------------------------------ weights


def test_fp4_group_scales_are_powers_of_two_under_a_row_scale():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 300, generator=gen) * torch.rand(40, 1, generator=gen)
    levels, exps, c = fp4_rtn(w, 64, search=False)
    assert torch.allclose(c, w.abs().amax(1) / 6, rtol=2**-23, atol=0) and (6 * c.double() >= w.abs().amax(1)).all()
    assert exps.shape == (40, 5) and int(exps.max()) == 0 and (exps.amax(1) == 0).all()
    amax = torch.nn.functional.pad(w, (0, 20)).abs().reshape(40, 5, 64).amax(-1)
    scale = c[:, None] * 2.0 ** exps.float()
    assert (amax <= 6 * scale).all()  # the group fits ...
    assert (amax > 3 * scale).all()  # ... and 2^(e-1) would not: e is the smallest
    vals = levels.float() / 2
    assert torch.equal(round_e2m1(vals), vals)  # every weight is an E2M1 value times its scale
    w_hat = fp4_dequantize(levels, exps, c, 64, 300)
    assert torch.equal(w_hat, (vals.double() * scale.double().repeat_interleave(64, 1)).float()[:, :300])
    _, exps_s, _ = fp4_rtn(w, 64, search=True)
    assert ((exps_s == exps) | (exps_s == exps - 1)).all() and (exps_s != exps).any()


def test_row_scale_search_never_increases_the_rtn_error():
    w, h, _ = _problem(n=48, k=256)
    imp = torch.diagonal(h)
    c0 = row_scales(w)
    c = search_row_scales(w, 64, True, 0.7, imp)
    ratio = c / c0
    assert ((ratio >= 0.7 - 1e-6) & (ratio <= 1.0)).all() and (ratio < 1).any()

    def err(cc):
        levels, exps, _ = fp4_rtn(w, 64, True, imp, cc)
        return (((fp4_dequantize(levels, exps, cc, 64, 256) - w).square() * imp).sum(1))

    assert (err(c) <= err(c0) * (1 + 1e-6)).all() and float(err(c).sum()) < float(err(c0).sum())
    (ql,) = ZeroQuantFPMethod({"lorc_rank": 0, "group_size": 64, "clip_min": 0.7}).quantize_linears(["l"], [w], h)
    assert torch.equal(ql.tensors["cscale"], c)


def test_fp4_grid_interface_matches_gptq_levels():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 32, generator=gen)
    grid = FP4Grid(row_scales(w), search=False)
    s = grid.scales(w)
    q = grid.quantize(w, s[:, None])
    assert torch.equal(q, q.round()) and int(q.abs().max()) <= 12
    assert set(q.abs().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0}
    ratio = s / grid.row_scale
    assert torch.equal(ratio, 2.0 ** torch.log2(ratio).round())


def test_gptq_on_the_fp4_grid_beats_round_to_nearest():
    w, h, _ = _problem()
    m = ZeroQuantFPMethod({"lorc_rank": 0, "group_size": 64})
    (ql,) = m.quantize_linears(["l"], [w], h)
    assert ql.layout == "fp4-fp8" and ql.tensors["sexp"].dtype == torch.int8
    levels, exps, c = fp4_rtn(w, 64, search=False)
    rtn = relative_output_error(w, fp4_dequantize(levels, exps, c, 64, w.shape[1]), h)
    assert ql.info["rtn_loss"] == pytest.approx(rtn, rel=1e-6)
    assert ql.info["gptq_loss"] < 0.7 * rtn, (ql.info["gptq_loss"], rtn)
    # the stored tensors decode to the weight GPTQ computed with
    codes = unpack_fp4(ql.tensors["qweight"])
    deq = fp4_dequantize(levels_to_codes_inverse(codes), ql.tensors["sexp"], ql.tensors["cscale"], 64, w.shape[1])
    assert torch.equal(deq, ql.dequantized)


def levels_to_codes_inverse(codes: torch.Tensor) -> torch.Tensor:
    return (codes_to_values(codes) * 2).to(torch.int8)


def test_lorc_reduces_the_error_and_rank_zero_is_no_lorc():
    w, h, _ = _problem(n=64, k=192)
    (plain,) = ZeroQuantFPMethod({"lorc_rank": 0, "group_size": 64}).quantize_linears(["l"], [w], h)
    (lorc,) = ZeroQuantFPMethod({"lorc_rank": 8, "group_size": 64}).quantize_linears(["l"], [w], h)
    for name in ("qweight", "sexp", "cscale"):  # LoRC comes after GPTQ: the same FP4 weights
        assert torch.equal(plain.tensors[name], lorc.tensors[name]), name
    assert "lorc_u" not in plain.tensors and "lorc_rank" not in plain.info
    u, v = lorc.tensors["lorc_u"], lorc.tensors["lorc_v"]
    assert u.dtype == v.dtype == torch.float16 and u.shape == (64, 8) and v.shape == (8, 192)
    e_plain, e_lorc = (w - plain.dequantized).norm(), (w - lorc.dequantized).norm()
    assert float(e_lorc) < 0.95 * float(e_plain)
    assert torch.allclose(lorc.dequantized, plain.dequantized + u.float() @ v.float(), atol=0, rtol=0)
    # the best rank-8 approximation of E: what is left is the tail of its singular values
    sv = torch.linalg.svdvals(w - plain.dequantized)
    assert float(e_lorc) == pytest.approx(float(sv[8:].norm()), rel=2e-2)
    assert lorc.info["lorc_loss"] < lorc.info["gptq_loss"]
    with pytest.raises(QConvertError, match="exceeds the layer's rank bound"):
        ZeroQuantFPMethod({"lorc_rank": 100}).quantize_linear("l", w[:, :64])


def test_hessian_weighted_lorc_lowers_the_output_error_more():
    w, h, _ = _problem()
    (plain,) = ZeroQuantFPMethod({"lorc_rank": 8, "group_size": 64}).quantize_linears(["l"], [w], h)
    (hw,) = ZeroQuantFPMethod({"lorc_rank": 8, "group_size": 64, "lorc_weighting": "hessian"}).quantize_linears(["l"], [w], h)
    assert torch.equal(plain.tensors["qweight"], hw.tensors["qweight"])
    assert hw.info["lorc_loss"] < plain.info["lorc_loss"] < plain.info["gptq_loss"]
    assert hw.info["weight_error_lorc"] > plain.info["weight_error_lorc"]  # the plain SVD is best in ‖E‖ itself
    with pytest.raises(QConvertError, match="needs calibration"):
        ZeroQuantFPMethod({"base": "rtn", "lorc_weighting": "hessian"})


def test_fp8_weights_per_channel():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(24, 70, generator=gen) * torch.rand(24, 1, generator=gen)
    ql = ZeroQuantFPMethod({"weight_format": "fp8", "base": "rtn", "lorc_rank": 0}).quantize_linear("l", w)
    q, s = ql.tensors["qweight"], ql.tensors["wscale"]
    assert ql.layout == "fp8-fp8" and q.dtype == torch.float8_e4m3fn and q.shape == (24, 128)
    assert torch.equal(s, w.abs().amax(1) / 448) and (q.float()[:, 70:] == 0).all()
    assert torch.equal(q.float()[:, :70], (w / s[:, None]).to(torch.float8_e4m3fn).float())
    assert float(((q.float()[:, :70] * s[:, None] - w).norm() / w.norm())) < 0.04


def test_config_errors_are_clear():
    with pytest.raises(QConvertError, match="base = 'rtn'"):
        ZeroQuantFPMethod({"weight_format": "fp8"})
    with pytest.raises(QConvertError, match="lorc_rank"):
        ZeroQuantFPMethod({"lorc_rank": -1})
    with pytest.raises(QConvertError, match="allowed parameters"):
        ZeroQuantFPMethod({"bits": 4})
    with pytest.raises(QConvertError, match="weight_format"):
        ZeroQuantFPMethod({"weight_format": "fp6"})


# ------------------------------------------------------------------ the CPU layouts


def _naive_fp4_fp8(x, codes, sexp, cscale, g):
    """The reference formula written out directly (float64 exact group sums, float32 after)."""
    xq, t = ref8.quantize_per_token_fp8(x, codes.shape[1])
    w = codes_to_values(codes).double()
    m, n = x.shape[0], codes.shape[0]
    y = torch.zeros(m, n)
    for j in range(codes.shape[1] // g):
        p = (xq.double()[:, j * g:(j + 1) * g] @ w[:, j * g:(j + 1) * g].T).float()
        y = y + p * torch.ldexp(torch.ones(n), sexp[:, j].long())[None]
    return y * (t[:, None] * cscale[None])


@pytest.mark.parametrize("lorc_rank", [0, 4])
def test_fp4_layout_forward_equals_the_reference(lorc_rank):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 200, generator=gen) * 0.05
    ql = ZeroQuantFPMethod({"base": "rtn", "lorc_rank": lorc_rank, "group_size": 64}).quantize_linear("l", w)
    bias = torch.randn(40, generator=gen)
    mod = FP8Linear("fp4-fp8", ql.tensors, bias)
    x = torch.randn(2, 9, 200, generator=gen)
    x[0, 3] = 0
    y = mod(x)
    x2 = x.reshape(-1, 200)
    want = _naive_fp4_fp8(x2, unpack_fp4(ql.tensors["qweight"]), ql.tensors["sexp"], ql.tensors["cscale"], 64)
    if lorc_rank:
        xq, t = ref8.quantize_per_token_fp8(x2, 256)
        want = want + ref8.lorc_term(xq, t, ql.tensors["lorc_u"], ql.tensors["lorc_v"])
    assert torch.equal(y.reshape(-1, 40), want + bias)
    exact = x2 @ ql.dequantized.T + bias
    assert float((y.reshape(-1, 40) - exact).norm() / exact.norm()) < 0.05  # only the FP8 activations differ


def test_fp8_layout_forward_equals_the_reference():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(30, 100, generator=gen) * 0.05
    ql = ZeroQuantFPMethod({"weight_format": "fp8", "base": "rtn", "lorc_rank": 2}).quantize_linear("l", w)
    mod = FP8Linear("fp8-fp8", ql.tensors, None)
    x = torch.randn(11, 100, generator=gen)
    xq, t = ref8.quantize_per_token_fp8(x, 128)
    acc = torch.zeros(11, 30)
    for c in range(2):  # chunks of 64 k, each summed exactly, then added in order in float32
        acc = acc + (xq.double()[:, 64 * c: 64 * c + 64] @ ql.tensors["qweight"].double()[:, 64 * c: 64 * c + 64].T).float()
    want = acc * (t[:, None] * ql.tensors["wscale"][None]) + ref8.lorc_term(xq, t, ql.tensors["lorc_u"], ql.tensors["lorc_v"])
    assert torch.equal(mod(x), want)
    exact = x @ ql.dequantized.T
    assert float((mod(x) - exact).norm() / exact.norm()) < 0.05


def test_reference_group_sums_are_exact():
    """Partials of extreme FP8 x FP4 operands (448 x 6 and subnormal 2^-9 x 0.5 mixed) equal the
    exact integer arithmetic in units of 2^-10."""
    gen = torch.Generator().manual_seed(7)
    kp, g = 256, 128
    bytes_ = torch.randint(0, 0x7F, (3, kp), generator=gen, dtype=torch.uint8) | (torch.randint(0, 2, (3, kp), generator=gen, dtype=torch.uint8) << 7)
    xq = bytes_.view(torch.float8_e4m3fn)
    codes = torch.randint(0, 16, (5, kp), generator=gen, dtype=torch.uint8)
    p = ref8.fp4_fp8_partials(xq, ref8.weight_groups(codes_to_values(codes), g))
    xi = (xq.double() * 2**9).long()  # integers
    wi = (codes_to_values(codes).double() * 2).long()
    for j in range(2):
        exact = xi[:, j * g:(j + 1) * g] @ wi[:, j * g:(j + 1) * g].T  # int64, units of 2^-10
        assert torch.equal(p[j].double(), (exact.double() / 2**10).float().double())


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def calib_src(tiny_calib_src):
    return tiny_calib_src


def _quantize(src, out, scheme, *extra):
    return quantize_tiny(src, out, scheme, "-g", "32", *extra)


@pytest.mark.parametrize("scheme,layout,max_rel", [("zqfp-w4a8", "fp4-fp8", 0.2), ("zqfp-w4a8-nolorc", "fp4-fp8", 0.25),
                                                    ("zqfp-w8a8", "fp8-fp8", 0.08)])
def test_presets_quantize_load_and_verify(calib_src, tmp_path, scheme, layout, max_rel):
    from transformers import AutoModelForCausalLM

    from qconvert import load
    from qconvert.verify import verify

    out = tmp_path / "out"
    res = _quantize(calib_src, out, scheme)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads((out / "qconvert.json").read_text())
    assert {r["layout"] for r in rep["layers"]} == {layout} and len(rep["layers"]) == 14
    if scheme == "zqfp-w4a8":
        assert all(r["lorc_rank"] == 8 and r["weight_error_lorc"] < r["weight_error"] for r in rep["layers"])
        assert all(r["gptq_loss"] < r["rtn_loss"] for r in rep["layers"])
    model = load(out)
    ref = AutoModelForCausalLM.from_pretrained(calib_src, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = model(ids).logits, ref(ids).logits
    assert torch.isfinite(a).all()
    assert float((a - b).norm() / b.norm()) < max_rel
    v = verify(out, data_file=calib_src.parent / "calib.txt")
    assert v.ok, v.failures
    assert v.top1_agreement > 0.8
    card = CliRunner().invoke(cli, ["push", str(out), "me/model", "--dry-run"])  # the card says FP4 / FP8, not int
    assert card.exit_code == 0 and "FP8 (E4M3), dynamic, per-token" in card.output and "- int4" not in card.output
    assert ("FP4 (E2M1), groups of 32" if layout == "fp4-fp8" else "FP8 (E4M3), per output channel") in card.output
    assert ("LoRC rank 8" in card.output) == (scheme == "zqfp-w4a8")
    # FP4 has no compressed-tensors form: the card says so instead of offering an export that fails
    assert (("cannot make a copy they read: this model (scheme" in card.output and "layout fp4-fp8" in card.output)
            if layout == "fp4-fp8" else "export a compressed-tensors copy with" in card.output)


def test_lorc_rank_option(calib_src, tmp_path):
    res = _quantize(calib_src, tmp_path / "a", "zqfp-w4a8-nolorc", "--lorc-rank", "4")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "a" / "qconvert.json").read_text())
    assert rep["scheme"]["params"]["lorc_rank"] == 4 and all(r["lorc_rank"] == 4 for r in rep["layers"])
    res = _quantize(calib_src, tmp_path / "b", "is-w4a8", "--lorc-rank", "4")
    assert res.exit_code != 0 and "--lorc-rank applies to zeroquant-fp schemes" in res.output
    res = _quantize(calib_src, tmp_path / "c", "zqfp-w4a8", "--lorc-rank", "-1")
    assert res.exit_code != 0 and "lorc_rank=-1 must be an integer in 0..4096" in res.output
    res = _quantize(calib_src, tmp_path / "d", "zqfp-w4a8", "--lorc-rank", "65")
    assert res.exit_code != 0 and "min(N, K) = " in res.output and "--lorc-rank" in res.output
    assert not (tmp_path / "d.partial").exists()


def test_verify_catches_a_damaged_fp4_layer(calib_src, tmp_path):
    from qconvert.formats.safetensors_io import write_safetensors
    from qconvert.formats.safetensors_io import ShardedReader
    from qconvert.verify import verify

    out = tmp_path / "out"
    assert _quantize(calib_src, out, "zqfp-w4a8", "--lorc-rank", "2").exit_code == 0
    reader = ShardedReader(out)
    state = {k: reader.get(k) for k in reader.keys()}
    state["model.layers.0.mlp.up_proj.sexp"] = state["model.layers.0.mlp.up_proj.sexp"].to(torch.int32)
    del state["model.layers.1.self_attn.q_proj.lorc_v"]
    write_safetensors(out / "model.safetensors", state)
    rep = verify(out, compare_source=False, save=False)
    text = "\n".join(rep.failures)
    assert "model.layers.0.mlp.up_proj.sexp is torch.int32" in text
    assert "model.layers.1.self_attn.q_proj.lorc_v is missing" in text
