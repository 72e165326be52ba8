"""The ZeroQuant-FP kernels (fp8_gemm.cu) proven on the CPU: the real launchers run with their
launches routed to the lane-exact emulator (fp8/emulate.py) and must equal the torch reference
bit for bit; the emulator checks every memory access, shared-memory race, stage and output write.
Its tensor-core accumulator is exact (PTX leaves the hardware's unspecified; the GPU tests,
tests/test_kernels_fp8_gpu.py, bound that difference), so equality here proves the data movement,
fragment layout, FP4 widening, folds and epilogue.  Mutation tests show deliberate bugs are caught.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import assert_mutation_caught, macro_params

from qconvert.formats.fp4 import codes_to_values, pack_fp4, unpack_fp4
from qconvert_kernels.fp8 import cuda as cuda_fp8
from qconvert_kernels.fp8 import emulate
from qconvert_kernels.fp8 import reference as ref8

CU = cuda_fp8.SOURCE.read_text()


@pytest.fixture(autouse=True)
def _sm90(monkeypatch):
    """The launchers ask for an sm_89+ device; the emulator stands in for an sm_90 one."""
    monkeypatch.setattr(cuda_fp8, "_capability", lambda index=0: 90)


def _activations(m, k, dtype, gen):
    x = (torch.randn((m, k), generator=gen) * torch.rand((m, 1), generator=gen) * 4).to(dtype)
    if m > 2:
        x[1] = 0
    return x


def fp4_case(m, n, k, g, dtype):
    """(x, E2M1 codes [N, Kp], group exponents, channel scales, Kp) of a fp4-fp8 GEMM case."""
    gen = torch.Generator().manual_seed(m * 1_000_003 + n * 1009 + k + g)
    kp = -(-k // g) * g
    codes = torch.randint(0, 16, (n, kp), generator=gen, dtype=torch.uint8)
    codes[:, k:] = 0
    sexp = torch.randint(-6, 3, (n, kp // g), generator=gen, dtype=torch.int8)
    cscale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    return _activations(m, k, dtype, gen), codes, sexp, cscale, kp


def fp8_case(m, n, k, dtype):
    """(x, E4M3 weights [N, Kp], their scales, Kp) of a fp8-fp8 GEMM case."""
    gen = torch.Generator().manual_seed(m * 999_983 + n * 1013 + k)
    kp = -(-k // 64) * 64
    w = torch.randn(n, k, generator=gen)
    wscale = w.abs().amax(1) / 448
    wq = torch.nn.functional.pad(ref8.to_e4m3(w / wscale[:, None]).view(torch.uint8), (0, kp - k)).view(torch.float8_e4m3fn)
    return _activations(m, k, dtype, gen), wq, wscale, kp


def run_fp4(m, n, k, g, dtype=torch.float16, mutations=frozenset()):
    x, codes, sexp, cscale, kp = fp4_case(m, n, k, g, dtype)
    with emulate.emulating(mutations=mutations) as emu:
        xq, t = cuda_fp8.quantize_per_token_fp8(x, kp)
        y = cuda_fp8.fp4_fp8_gemm(xq, t, pack_fp4(codes), sexp, cscale, g, dtype)
    xq_ref, t_ref = ref8.quantize_per_token_fp8(x, kp)
    assert torch.equal(xq.view(torch.uint8), xq_ref.view(torch.uint8)) and torch.equal(t, t_ref), "quantizer differs"
    want = ref8.fp4_fp8_gemm(xq_ref, t_ref, ref8.weight_groups(codes_to_values(codes), g), sexp, cscale).to(dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"y differs in {(y != want).sum()} places"
    return emu


def run_fp8(m, n, k, dtype=torch.float16, mutations=frozenset()):
    x, wq, wscale, kp = fp8_case(m, n, k, dtype)
    with emulate.emulating(mutations=mutations) as emu:
        xq, t = cuda_fp8.quantize_per_token_fp8(x, kp)
        y = cuda_fp8.fp8_fp8_gemm(xq, t, wq, wscale, dtype)
    want = ref8.fp8_fp8_gemm(xq, t, wq, wscale).to(dtype)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"y differs in {(y != want).sum()} places"
    return emu


# (M, N, K, g): odd M and N, one and several tiles, K padded to the group, Kp % 64 == 32
# (a half stage that must not count towards a group), g = 32 .. 128
FP4_CASES = [(1, 8, 576, 128), (3, 13, 300, 96), (17, 72, 256, 64), (66, 130, 160, 32), (5, 64, 96, 32)]


@pytest.mark.parametrize("m,n,k,g", FP4_CASES)
def test_fp4_fp8_bit_exact(m, n, k, g):
    run_fp4(m, n, k, g)


@pytest.mark.parametrize("m,n,k", [(1, 8, 576), (3, 13, 96), (66, 130, 256)])
def test_fp8_fp8_bit_exact(m, n, k):
    run_fp8(m, n, k)


def test_bf16():
    run_fp4(17, 72, 256, 64, torch.bfloat16)
    run_fp8(3, 13, 96, torch.bfloat16)


@pytest.mark.parametrize("scheme_params", [{"base": "rtn", "lorc_rank": 4, "group_size": 64},
                                           {"weight_format": "fp8", "base": "rtn", "lorc_rank": 0}])
def test_layer_made_by_the_method_runs_on_the_kernels(scheme_params):
    """An FP8Linear as ZeroQuant-FP makes it: its CUDA path (quantizer, GEMM, LoRC added to the
    kernel's rounded output) on the emulator equals its CPU path's result taken through the same
    roundings: the layout's tensors are the ones the kernels read."""
    from qconvert.layouts.fp8 import FP8Linear
    from qconvert.methods.zeroquant_fp import ZeroQuantFPMethod

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(72, 320, generator=gen) * 0.05
    ql = ZeroQuantFPMethod(scheme_params).quantize_linear("l", w)
    lin = FP8Linear(ql.layout, ql.tensors, None)
    assert lin.layout == ("fp8-fp8" if scheme_params.get("weight_format") == "fp8" else "fp4-fp8")
    x2 = torch.randn(7, 320, generator=gen).half()
    with emulate.emulating():
        got = lin._forward_cuda(x2)
    xq, t = ref8.quantize_per_token_fp8(x2, lin.kp)
    if lin.layout == "fp4-fp8":
        y = ref8.fp4_fp8_gemm(xq, t, ref8.weight_groups(codes_to_values(unpack_fp4(lin.qweight)), lin.group_size),
                              lin.sexp, lin.cscale)
    else:
        y = ref8.fp8_fp8_gemm(xq, t, lin.qweight, lin.wscale)
    want = y.half()
    if lin.lorc_rank:
        want = (want.float() + ref8.lorc_term(xq, t, lin.lorc_u, lin.lorc_v)).half()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_widening_table_gives_every_e2m1_value():
    """fp4x8_to_e4m3 (PRMT table and sign) maps each of the 16 codes to the E4M3 byte of its value."""
    ctx = emulate.Ctx(None, {}, frozenset(), emulate.FloatOps(False))
    codes = np.arange(16, dtype=np.uint32)
    words = np.array([sum(int(codes[(i + j) % 16]) << (4 * j) for j in range(8)) for i in range(16)], np.uint32)
    b0, b1 = emulate.fp4x8_to_e4m3(ctx, words)
    got = emulate.e4m3_values(np.stack([b0, b1], -1)).reshape(16, 8)
    values = ref8.e2m1_codebook().double().numpy()
    want = np.array([[values[(i + j) % 16] for j in range(8)] for i in range(16)])
    assert (got == want).all() and (np.signbit(got) == np.signbit(want)).all()


def test_constants_and_parameters_match_the_source():
    for name in ("BM", "BN", "BK", "THREADS", "A_STRIDE", "B4_STRIDE", "QUANT_THREADS"):
        v = int(re.search(rf"constexpr int {name} = (\d+);", CU).group(1))
        assert v == getattr(emulate, name), name
    assert f"0x{emulate.T_LO:08X}u" in CU and f"0x{emulate.T_HI:08X}u" in CU
    assert macro_params(CU, "ZQ_FP4_GEMM") == emulate.FP4_PARAMS
    assert macro_params(CU, "ZQ_FP8_GEMM") == emulate.FP8_PARAMS
    assert macro_params(CU, "ZQ_QUANT") == emulate.QUANT_PARAMS


def test_fragment_loads_are_bank_conflict_free():
    conflicts = {**run_fp4(17, 72, 256, 64).conflicts, **run_fp8(3, 13, 96).conflicts}
    for site in ("fp8 A LDS.64", "fp4 B LDS.32", "fp8 B LDS.64"):
        assert conflicts[site] == 1, (site, conflicts[site])


MUTATION_CASES = {
    "swap_a": (run_fp8, (3, 13, 96), "differs"),
    "no_tail_sync": (run_fp4, (3, 13, 300, 96), "error"),
    "fp4_table": (run_fp4, (3, 13, 300, 96), "differs"),
    "fp4_sign": (run_fp4, (3, 13, 300, 96), "differs"),
    "scale_stale": (run_fp4, (3, 72, 256, 64), "differs"),
    "quant_short": (run_fp4, (1, 8, 576, 128), "error"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATION_CASES))
def test_mutation_is_caught(mutation):
    runner, args, expected = MUTATION_CASES[mutation]
    assert_mutation_caught(runner, args, mutation, expected, emulate.EmulationError)


def test_every_mutation_has_a_test():
    assert set(MUTATION_CASES) == set(emulate.MUTATIONS)
