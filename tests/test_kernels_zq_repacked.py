"""ZeroQuant-FP fp4-fp8 at decode on the repacked W4A8 decode kernel (fp8/fp8_repacked.cu, KIND_ZQ of
w4a8_repacked.cu) proven on the CPU: the real launcher (``w4a8.cuda.prepare("fp4-fp8", ...)`` /
``linear``) runs with its launches routed to the lane-exact emulator (w4a8/emulate.py), and y must
equal the torch reference (fp8/reference.py, in the plan's split order) bit for bit.  The emulator
keeps the FP8 tensor cores' group partial exact, as the reference does (fp8/emulate.py says why);
the GPU test (tests/test_kernels_fp8_gpu.py) holds the hardware to the reference's tolerance.
Mutations show the E2M1 widening, the E4M3 scaling and the shared pipeline are checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_mutation_caught, needs_cpu_row_scaled_mm
from test_kernels_w4a8_emulate import activations  # an all-zero token among them

from qconvert.formats.fp4 import codes_to_values, pack_fp4, unpack_fp4
from qconvert_kernels.fp8 import REPACKED
from qconvert_kernels.fp8 import reference as ref8
from qconvert_kernels.w4a8 import cuda, emulate, repack

row_scaled_mm = needs_cpu_row_scaled_mm()  # the tests of the row-wise FP8 GEMM's paths


def make_fp4_layer(n: int, k: int, g: int, seed: int) -> dict:
    """A random fp4-fp8 layer as stored: E2M1 codes (every one of the 16), exponents, channel scales."""
    gen = torch.Generator().manual_seed(seed)
    kp = -(-k // g) * g
    codes = torch.randint(0, 16, (n, kp), generator=gen, dtype=torch.uint8)
    codes[:, k:] = 0
    return {"qweight": pack_fp4(codes), "shape": torch.tensor([n, k]),
            "sexp": torch.randint(-6, 4, (n, kp // g), generator=gen, dtype=torch.int8),
            "cscale": torch.rand(n, generator=gen) * 0.01 + 1e-3}


def reference(x, tensors, g, bounds):
    n, k = (int(v) for v in tensors["shape"])
    kp = tensors["qweight"].shape[1] * 2
    xq, t = ref8.quantize_per_token_fp8(x, kp)
    wg = ref8.weight_groups(codes_to_values(unpack_fp4(tensors["qweight"])), g)
    return ref8.fp4_fp8_gemm_split(xq, t, wg, tensors["sexp"], tensors["cscale"], bounds).to(x.dtype)


def check_case(m, n, k, g, dtype=torch.float16, sm_count=8, **kw):
    """Emulated launcher == reference in the plan's split order, bit for bit; returns the plan."""
    seed = m * 1_000_003 + n * 1009 + k * 7 + g
    tensors = make_fp4_layer(n, k, g, seed)
    x = activations(m, k, dtype, seed)
    prep = cuda.prepare("fp4-fp8", tensors, g, "cpu")
    with emulate.emulating(sm_count=sm_count, **kw) as emu:
        y = cuda.linear(x, prep)
    pl = cuda.plan(m, prep, sm_count)
    want = reference(x, tensors, g, pl.split_bounds())
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"y differs in {(y != want).sum()} places"
    assert [name for name, *_ in emu.launches] == [pl.kernel]  # one launch: the quantizer fused in
    return pl, emu


def test_widening_of_every_code_in_every_position():
    """w4r::fp4x8r_to_e4m3 (as the emulator runs it) gives the E4M3 byte of each E2M1 code, k..k+3 in
    the low register and k+4..k+7 in the high one, for every code at every nibble position."""
    ctx = emulate.Ctx(None, {}, frozenset(), emulate.FloatOps(False))
    codes = torch.arange(16, dtype=torch.int64)
    want = ref8.e2m1_to_e4m3_bits(codes.to(torch.uint8)).numpy()
    for i in range(8):  # k + i sits at nibble position 2i (i < 4) or 2(i - 4) + 1
        pos = 2 * i if i < 4 else 2 * (i - 4) + 1
        words = (codes << (4 * pos)).numpy().astype(np.uint32)  # every other position holds code 0
        lo, hi = emulate.fp4x8r_to_e4m3(ctx, words)
        reg, byte = (lo, i) if i < 4 else (hi, i - 4)
        got = (reg >> np.uint32(8 * byte)) & np.uint32(0xFF)
        assert np.array_equal(got.astype(np.uint8), want), i
        # every other byte is code 0's E4M3 byte, 0
        assert all(((r >> np.uint32(8 * b)) & 0xFF == 0).all() for r in (lo, hi) for b in range(4)
                   if not (r is reg and b == byte)), i


def test_repacked_nibbles_carry_fp4_codes_unchanged():
    codes = torch.randint(0, 16, (136, 256), dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert torch.equal(repack.unrepack_weight(repack.repack_weight(packed), 136, 256), packed)


DECODE_CASES = [  # (M, N, K, g, SMs): M from 1 to 64, N and K tails, g = 32 .. 256
    (1, 136, 256, 128, 8),
    (2, 256, 576, 64, 8),
    (3, 130, 300, 96, 8),       # K % 8 != 0: scalar activation loads; Kp % 64 == 32
    (7, 136, 512, 256, 8),
    (16, 128, 448, 32, 8),      # g = 32: a fold every k step; uneven splits
    (17, 200, 640, 128, 1),     # one split: bit-exact with the plain fp4_fp8_gemm
    (64, 256, 1280, 128, 2),    # three activation chunks
    (5, 13, 96, 32, 8),         # N = 13: most channels of the CTA are padding
]


@pytest.mark.parametrize("m,n,k,g,sms", DECODE_CASES)
def test_zq_decode_bit_exact(m, n, k, g, sms):
    pl, _ = check_case(m, n, k, g, sm_count=sms)
    assert pl.kind == "decode" and pl.kernel == f"w4a8r_decode_zq_m{8 * pl.mt8}"


def test_zq_bf16_and_the_exchange_path():
    pl, emu = check_case(9, 136, 1024, 128, dtype=torch.bfloat16)
    assert pl.amax_ctas > 0 and emu.amax_paths[0].get("exchange")


def test_one_split_equals_the_plain_reference():
    m, n, k, g = 4, 200, 640, 128
    tensors = make_fp4_layer(n, k, g, 5)
    x = activations(m, k, torch.float16, 5)
    prep = cuda.prepare("fp4-fp8", tensors, g, "cpu")
    with emulate.emulating(sm_count=1):
        y = cuda.linear(x, prep)
    assert cuda.plan(m, prep, 1).splits == 1
    xq, t = ref8.quantize_per_token_fp8(x, prep.kp)
    wg = ref8.weight_groups(codes_to_values(unpack_fp4(tensors["qweight"])), g)
    want = ref8.fp4_fp8_gemm(xq, t, wg, tensors["sexp"], tensors["cscale"]).half()
    assert torch.equal(y, want)


def test_prefill_sizes_are_refused_with_the_way_out():
    tensors = make_fp4_layer(128, 256, 128, 1)
    prep = cuda.prepare("fp4-fp8", tensors, 128, "cpu")
    with pytest.raises(ValueError, match="runs M=65 > 64 as zq_prefill"):
        cuda.plan(65, prep, 8)


def test_prepare_checks_the_fp4_tensors():
    tensors = make_fp4_layer(128, 256, 128, 1)
    bad = dict(tensors, sexp=tensors["sexp"].to(torch.int32))
    with pytest.raises(ValueError, match="sexp must be int8"):
        cuda.prepare("fp4-fp8", bad, 128, "cpu")
    with pytest.raises(ValueError, match="needs tensor 'cscale'"):
        cuda.prepare("fp4-fp8", {k: v for k, v in tensors.items() if k != "cscale"}, 128, "cpu")


MUTATION_CASES = {
    "zq_gather": ((5, 136, 512, 128), "mismatch"),
    "zq_sign": ((5, 136, 512, 128), "mismatch"),
    "zq_qmax": ((3, 136, 256, 128), "mismatch"),
    "swap_halves": ((5, 136, 512, 128), "mismatch"),
    "c_map": ((3, 136, 576, 64), "mismatch"),
    "k_perm": ((5, 136, 512, 128), "mismatch"),
    "stage_off_by_one": ((5, 136, 512, 128), "error"),
    "no_barrier": ((5, 136, 512, 128), "error"),
    "amax_local": ((16, 136, 1024, 128), "mismatch"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATION_CASES))
def test_mutation_is_caught_on_the_zq_decode(mutation):
    case, expected = MUTATION_CASES[mutation]
    assert_mutation_caught(check_case, case, mutation, expected, emulate.EmulationError)


def test_entry_points_are_the_declared_ones():
    import re

    text = REPACKED.path.read_text()
    assert "#define W4R_NO_ENTRIES" in text  # the W4A8 entry points stay out of this module
    # the widening kernel's parameters are the emulator's, in order
    body = re.search(r"w4a8r_widen_zq\((.*?)\) \{", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body)
    assert tuple(re.findall(r"(\w+)\s*$", d.strip())[0] for d in body.split(",")) == emulate.WIDEN_PARAMS
    for name, params in (("w4a8r_lorc_h_zq", emulate.LORC_H_PARAMS),):
        body = re.sub(r"/\*.*?\*/", "", re.search(rf"{name}\((.*?)\) \{{", text, re.S).group(1))
        assert tuple(re.findall(r"(\w+)\s*$", d.strip())[0] for d in body.split(",")) == params
    body = re.search(r"#define W4R_DECODE_ZQ\(.*?NAME\((.*?)\) \{", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body).replace("\\", " ")
    assert tuple(re.findall(r"(\w+)\s*$", d.strip())[0] for d in body.split(",")) == emulate.ZQ_DECODE_PARAMS
    assert f"constexpr int MAX_R = {emulate.LORC_MAX_R};" in text and cuda.LORC_MAX_R == emulate.LORC_MAX_R
    entries = re.findall(r"^W4R_DECODE_ZQ\((\w+),", text, flags=re.M)
    assert sorted(REPACKED.kernels) == sorted(entries + ["w4a8r_widen_zq", "w4a8r_lorc_h_zq"])


@row_scaled_mm
def test_method_made_layer_decodes_on_the_repacked_kernel():
    """An FP8Linear as ZeroQuant-FP makes it (LoRC on), prepared on the CPU as runtime.load prepares it
    on the GPU: at M <= 64 its forward takes LoRC's h kernel and the repacked decode kernel (here the
    emulator), which adds LoRC's term before its one rounding, in the lanes reference's order."""
    from qconvert.layouts.fp8 import FP8Linear
    from qconvert.methods.zeroquant_fp import ZeroQuantFPMethod

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(136, 320, generator=gen) * 0.05
    ql = ZeroQuantFPMethod({"base": "rtn", "lorc_rank": 4, "group_size": 64}).quantize_linear("l", w)
    lin = FP8Linear(ql.layout, ql.tensors, None)
    x = torch.randn(2, 3, 320, generator=gen).half()
    assert not lin._on_repacked(x.reshape(-1, 320))
    lin.prepare_cuda("cpu")
    assert lin._on_repacked(x.reshape(-1, 320))
    with emulate.emulating(sm_count=8) as emu:
        got = lin(x)
    assert [name for name, *_ in emu.launches] == ["w4a8r_lorc_h_zq", "w4a8r_decode_zq_m8"]
    x2 = x.reshape(-1, 320)
    xq, t = ref8.quantize_per_token_fp8(x2, lin.kp)
    bounds = cuda.plan(6, lin._prepared, 8).split_bounds()
    wg = ref8.weight_groups(codes_to_values(unpack_fp4(lin.qweight)), lin.group_size)
    y = ref8.fp4_fp8_gemm_split(xq, t, wg, lin.sexp, lin.cscale, bounds)
    want = ref8.lorc_tail(y, ref8.lorc_h_lanes(xq, t, lin.lorc_v), lin.lorc_u).half()
    assert torch.equal(got.reshape(-1, 136).view(torch.int16), want.view(torch.int16))
    # and within float rounding of the CPU path's one-rounding LoRC
    cpu = (y + ref8.lorc_term(xq, t, lin.lorc_u, lin.lorc_v)).half()
    assert float((got.reshape(-1, 136).float() - cpu.float()).abs().max()) <= 2 * float(cpu.float().abs().max()) * 2.0**-10
    # prefill sizes: the widened weights and the FP8 GEMM (here torch._scaled_mm's CPU kernel), LoRC on
    # the same quantized activations
    xp = (torch.randn(70, 320, generator=gen) * 0.5).half()
    assert lin._on_repacked(xp)
    with emulate.emulating(sm_count=8) as emu:
        got = lin(xp)
    assert [name for name, *_ in emu.launches] == ["w4a8r_widen_zq"]
    xq, t = ref8.quantize_per_token_fp8(xp, lin.kp)
    want = ref8.fp4_fp8_gemm_widened(xq, t, wg, lin.sexp, lin.cscale) + ref8.lorc_term(xq, t, lin.lorc_u, lin.lorc_v)
    assert float((got.float() - want).abs().max()) <= 2e-3 * float(want.abs().max())
    # the stored tensors stay on the host through later moves once the repacked copy serves every M
    held = {name: getattr(lin, name) for name in ("qweight", "sexp", "cscale")}
    lin.keep_stored_on_host()
    lin.to(torch.float64)
    assert all(getattr(lin, name) is held[name] for name in held) and lin.lorc_u.dtype == torch.float64


def test_prediction_script_labels_its_rows():
    """benchmarks/zqfp_repacked_prediction.py (docs/kernels.md quotes it): a row per Llama-3-8B linear,
    labelled a prediction, at M = 1 between the W4A8-FS decode's measured time and that x 708 / 602,
    and at M = 4096 the quantizer, the widening and the assumed FP8 GEMM."""
    from helpers import prediction_json

    data = prediction_json("zqfp_repacked_prediction.py")
    rows = data["rows"]
    assert sorted(r["shape"] for r in rows) == ["down_proj", "gate_up_proj", "q/o_proj", "qkv_proj"]
    for r in rows:
        lo, hi = r["predicted_us"]
        assert 0 < lo < hi <= lo * 708 / 602 + 0.1 and r["first_us"] > hi
    prefill = data["prefill"]
    assert sorted(r["shape"] for r in prefill) == ["down_proj", "gate_up_proj", "q/o_proj", "qkv_proj"]
    assert all(r["M"] == 4096 and 0 < r["widen_us"] < r["predicted_us"][0] < r["predicted_us"][1] < r["first_us"] for r in prefill)
    fp8 = data["fp8_fp8"]  # fp8-fp8 on torch._scaled_mm: quantizer + GEMM
    assert sorted((r["M"], r["shape"]) for r in fp8) == [(m, s) for m in (1, 4096)
                                                        for s in ("down_proj", "gate_up_proj", "q/o_proj", "qkv_proj")]
    for r in fp8:
        lo, hi = r["predicted_us"]
        assert 0 < lo < hi < r["first_us"]  # every predicted time under the first kernel's measured one


# ---- prefill (M > 64): the weights widened to E4M3 (w4a8r_widen_zq), then an FP8 GEMM with row scales


@row_scaled_mm
def test_widen_kernel_gives_the_exact_e4m3_weights():
    """w4a8r_widen_zq on the emulator: every byte of w8 [N16, Kq] is the E4M3 value of
    w * 2^(e + s[n]) (written once); w8 * c 2^-s is the stored weight exactly."""
    for n, k, g in ((136, 256, 128), (13, 300, 96), (200, 640, 32)):
        tensors = make_fp4_layer(n, k, g, n + k)
        prep = cuda.prepare("fp4-fp8", tensors, g, "cpu")
        assert prep.widen_exp is not None
        with emulate.emulating() as emu:
            w8 = cuda.widen_zq(prep)
        assert [name for name, *_ in emu.launches] == ["w4a8r_widen_zq"]
        n16, kp = -(-n // 16) * 16, prep.kp
        assert w8.dtype == torch.float8_e4m3fn and w8.shape == (n16, prep.kq)
        values = codes_to_values(unpack_fp4(tensors["qweight"])).double()
        pow2 = torch.ldexp(torch.ones(n, kp // g, dtype=torch.float64), tensors["sexp"].double()).repeat_interleave(g, 1)
        stored = values * pow2 * tensors["cscale"].double()[:, None]
        got = w8.double()[:n, :kp] * prep.widen_cscale[:n].double()[:, None]
        assert torch.equal(got, stored)
        assert not w8.view(torch.uint8)[n:].any() and not w8.view(torch.uint8)[:, kp:].any()


@row_scaled_mm
def test_widen_reaches_both_ends_of_the_e4m3_range_and_skips_zero_groups():
    """A row spanning exactly 14 (e + s from -8: E4M3 subnormals, to 6: |w| up to 384) widens exactly;
    an all-zero group with the method's E_MIN exponent does not count towards its row's span."""
    n, k, g = 32, 512, 64
    tensors = make_fp4_layer(n, k, g, 11)
    codes = unpack_fp4(tensors["qweight"])
    codes[3] = torch.tensor([7, 15, 1, 9] * (k // 4), dtype=torch.uint8)  # 6, -6, 0.5, -0.5 in every group
    codes[4, :g] = 0                                                         # group 0 of row 4: all zero
    tensors["qweight"] = pack_fp4(codes)
    tensors["sexp"][3] = torch.tensor([-10, 4, 0, -3, 1, -2, 2, -1], dtype=torch.int8)  # span 14
    tensors["sexp"][4, 0] = -64
    prep = cuda.prepare("fp4-fp8", tensors, g, "cpu")
    assert prep.widen_exp is not None
    with emulate.emulating():
        w8 = cuda.widen_zq(prep)
    values = codes_to_values(codes).double()
    pow2 = torch.ldexp(torch.ones(n, k // g, dtype=torch.float64), tensors["sexp"].double()).repeat_interleave(g, 1)
    got = w8.double()[:n, :k] * prep.widen_cscale[:n].double()[:, None]
    assert torch.equal(got, values * pow2 * tensors["cscale"].double()[:, None])
    assert float(w8.double()[3].abs().max()) == 384.0 and float(w8.double()[3].abs()[w8.double()[3] != 0].min()) == 2.0**-9


def test_emulator_constants_are_the_kernel_text():
    """The widening's table, masks and selectors as the emulator runs them are the .cu's."""
    import re

    cu = cuda.SOURCE_R.read_text()
    body = re.search(r"void fp4x8r_to_e4m3\(.*?\n\}", cu, re.S).group(0)
    assert f"T_LO = 0x{emulate.FP4_T_LO:08X}u" in body and f"T_HI = 0x{emulate.FP4_T_HI:08X}u" in body
    assert "w & 0x7777u" in body and "(w >> 16) & 0x7777u" in body
    assert "__byte_perm(l, h, 0x6420) | ((w << 4) & 0x80808080u)" in body
    assert "__byte_perm(l, h, 0x7531) | (w & 0x80808080u)" in body
    assert "constexpr float Q = kKind == KIND_ZQ ? 448.0f : 127.0f;" in cu


def test_a_zq_kernel_launched_from_the_w4a8_module_is_refused():
    from qconvert_kernels import launch

    with emulate.emulating(), pytest.raises(emulate.EmulationError, match="does not define it"):
        launch.launch(cuda.SOURCE_R, "w4a8r_widen_zq", (1, 8), (256,), (0,) * 7, torch.device("cpu"))
    with emulate.emulating(), pytest.raises(emulate.EmulationError, match="does not define it"):
        launch.launch(cuda.SOURCE_ZQ, "w4a8r_decode_is_m8", (1, 1), (256,), (0,) * 22, torch.device("cpu"))


@row_scaled_mm
def test_widen_refuses_rows_whose_exponents_span_more_than_e4m3_holds():
    tensors = make_fp4_layer(128, 256, 64, 2)
    tensors["sexp"][5] = torch.tensor([-10, 0, 3, -2], dtype=torch.int8)    # a span of 13: fits
    assert cuda.prepare("fp4-fp8", tensors, 64, "cpu").widen_exp is not None
    tensors["sexp"][5, 0] = -12                                               # 15: does not
    prep = cuda.prepare("fp4-fp8", tensors, 64, "cpu")
    assert prep.widen_exp is None
    with pytest.raises(ValueError, match="span <= 14"):
        cuda.widen_zq(prep)


@row_scaled_mm
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_on_the_widened_weights_matches_the_reference(dtype):
    """zq_prefill's composition on the CPU (torch._scaled_mm's CPU kernel, the emulated widening)
    equals the exact-sum reference within the FP8 tests' tolerance and the grouped reference too."""
    m, n, k, g = 70, 136, 640, 128
    tensors = make_fp4_layer(n, k, g, 9)
    x = activations(m, k, dtype, 9)
    prep = cuda.prepare("fp4-fp8", tensors, g, "cpu")
    xq, t = ref8.quantize_per_token_fp8(x, prep.kq)
    with emulate.emulating():
        y = cuda.zq_prefill(xq, t, prep, dtype)
    assert y.shape == (m, n) and y.dtype == dtype
    wg = ref8.weight_groups(codes_to_values(unpack_fp4(tensors["qweight"])), g)
    want = ref8.fp4_fp8_gemm_widened(xq[:, : prep.kp], t, wg, tensors["sexp"], tensors["cscale"])
    grouped = ref8.fp4_fp8_gemm(xq[:, : prep.kp], t, wg, tensors["sexp"], tensors["cscale"])
    y_abs = ref8.fp4_fp8_gemm(xq[:, : prep.kp].float().abs().to(torch.float8_e4m3fn), t, ref8.weight_groups(
        codes_to_values(unpack_fp4(tensors["qweight"])).abs(), g), tensors["sexp"], tensors["cscale"])
    eps = torch.finfo(dtype).eps
    for ref in (want, grouped):
        bound = 2.0**-9 * y_abs + eps * ref.abs() + torch.finfo(dtype).tiny
        assert float(((y.float() - ref).abs() / bound).max()) <= 1.0


@row_scaled_mm
@pytest.mark.parametrize("mutation", ["widen_row", "widen_group"])
def test_widen_mutations_are_caught(mutation):
    tensors = make_fp4_layer(136, 256, 64, 3)
    prep = cuda.prepare("fp4-fp8", tensors, 64, "cpu")
    with emulate.emulating() as _:
        good = cuda.widen_zq(prep).view(torch.uint8).clone()
    with pytest.raises((emulate.EmulationError, AssertionError)):
        with emulate.emulating(mutations=frozenset({mutation})):
            bad = cuda.widen_zq(prep).view(torch.uint8)
        assert torch.equal(bad, good), "differs"


def check_lorc_case(m, n, k, g, r, dtype=torch.float16, sm_count=8, **kw):
    """The decode with LoRC (rank r) on the emulator == the lanes reference, bit for bit."""
    seed = m * 7919 + n * 31 + k + r
    tensors = make_fp4_layer(n, k, g, seed)
    gen = torch.Generator().manual_seed(seed)
    tensors["lorc_u"] = (torch.randn(n, r, generator=gen) * 0.05).half()
    tensors["lorc_v"] = (torch.randn(r, k, generator=gen) * 0.05).half()
    x = activations(m, k, dtype, seed)
    prep = cuda.prepare("fp4-fp8", tensors, g, "cpu")
    with emulate.emulating(sm_count=sm_count, **kw) as emu:
        y = cuda.linear(x, prep)
    pl = cuda.plan(m, prep, sm_count)
    assert [name for name, *_ in emu.launches] == ["w4a8r_lorc_h_zq", pl.kernel]
    xq, t = ref8.quantize_per_token_fp8(x, prep.kp)
    wg = ref8.weight_groups(codes_to_values(unpack_fp4(tensors["qweight"])), g)
    y32 = ref8.fp4_fp8_gemm_split(xq, t, wg, tensors["sexp"], tensors["cscale"], pl.split_bounds())
    want = ref8.lorc_tail(y32, ref8.lorc_h_lanes(xq, t, tensors["lorc_v"]), tensors["lorc_u"]).to(dtype)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"y differs in {(y != want).sum()} places"


@pytest.mark.parametrize("m,n,k,g,r,dtype", [(1, 136, 256, 128, 8, torch.float16), (5, 200, 640, 64, 16, torch.bfloat16),
                                             (3, 13, 300, 96, 1, torch.float16), (33, 136, 1000, 128, 8, torch.float16),
                                             (2, 72, 512, 128, 32, torch.bfloat16)])  # the kernels' largest rank
def test_decode_adds_lorc_in_its_epilogue(m, n, k, g, r, dtype):
    check_lorc_case(m, n, k, g, r, dtype)


def test_lorc_above_the_kernels_rank_stays_in_torch():
    tensors = make_fp4_layer(128, 256, 128, 4)
    r = cuda.LORC_MAX_R + 1
    tensors["lorc_u"], tensors["lorc_v"] = torch.zeros(128, r).half(), torch.zeros(r, 256).half()
    assert cuda.prepare("fp4-fp8", tensors, 128, "cpu").lorc_u is None


def test_lorc_h_kernel_bit_exact_and_its_mutations_caught():
    """h itself (before the epilogue's rounding hides its last bits): the lanes reference bit for bit,
    and a lane-order sum is caught; U read from the wrong row is caught in y."""
    m, k, r = 5, 3000, 8
    tensors = make_fp4_layer(136, k, 128, 6)
    gen = torch.Generator().manual_seed(6)
    tensors["lorc_u"] = (torch.randn(136, r, generator=gen) * 0.05).half()
    tensors["lorc_v"] = (torch.randn(r, k, generator=gen) * 0.05).half()
    prep = cuda.prepare("fp4-fp8", tensors, 128, "cpu")
    x = activations(m, k, torch.float16, 6)
    xq, t = ref8.quantize_per_token_fp8(x, prep.kp)
    want = ref8.lorc_h_lanes(xq, t, tensors["lorc_v"])
    with emulate.emulating():
        h = cuda.lorc_h(x, prep)
    assert torch.equal(h, want)
    with emulate.emulating(mutations=frozenset({"lorc_lanes"})):
        assert not torch.equal(cuda.lorc_h(x, prep), want)
    with pytest.raises(AssertionError, match="differs"):
        check_lorc_case(5, 136, 1000, 128, 8, mutations=frozenset({"lorc_u_row"}))
