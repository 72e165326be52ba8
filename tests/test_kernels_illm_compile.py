"""Build checks of the I-LLM CUDA kernels (illm_gemm.cu) without a GPU: nvcc compiles them for
sm_80, sm_89 and sm_90 without spills or local memory, the GEMMs use the int8 tensor cores, and
no kernel does float arithmetic: not even integer division goes through the float unit (the
kernels divide with integer code, common.cuh).  The constants written in
the source are the reference's."""

from __future__ import annotations

import re

import pytest

from qconvert_kernels import compile as kc
from qconvert_kernels.illm import reference as ri
from qconvert_kernels.illm.cuda import ATTN_MAX_D
from test_kernels_compile import _sass, compile_all

pytestmark = pytest.mark.skipif(kc.nvcc_path() is None, reason="nvcc not found")

ARCHS = kc.ARCHS


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return compile_all(tmp_path_factory.mktemp("illm-cubins"), ARCHS, kc.ILLM_SOURCE)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_no_local_memory(builds, arch):
    report, per_kernel = builds[arch][0], _sass(builds, arch)
    for name in kc.ILLM_KERNELS:
        assert (report[name]["spill_stores"], report[name]["spill_loads"], report[name]["stack"]) == (0, 0, 0), (arch, name)
        assert kc.local_memory_ops(per_kernel[name]) == [], (arch, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_tensor_cores_and_no_float_arithmetic(builds, arch):
    per_kernel = _sass(builds, arch)
    for name in kc.ILLM_GEMM_KERNELS:
        assert {op: c for op, c in kc.opcodes(per_kernel[name]).items() if "MMA" in op} == {"IMMA.16832.S8.S8": 16}
    for name in kc.ILLM_KERNELS:
        ops = kc.opcodes(per_kernel[name])
        # the integer divisions are integer code (common.cuh: udiv_u64, DivBy): no float-unit
        # instruction at all (compile.float_unit_ops: FLO, DEPBAR and ptxas's zeroing HFMA2.MMA are not float)
        assert kc.float_unit_ops(ops, per_kernel[name]) == [], (arch, name, kc.float_unit_ops(ops, per_kernel[name]))


def test_a_zeroing_hfma2_is_a_move_and_any_other_float_op_is_not():
    """ptxas writes immediates to registers with ``HFMA2.MMA Rd, -RZ, RZ, a, b`` (the GEMV's zeroed
    accumulators, integer constants): no float arithmetic; an HFMA2.MMA of registers, or one beside
    such moves, still counts."""
    zero = ("/*0f40*/   HFMA2.MMA R40, -RZ, RZ, 0, 0 ;   /* 0x00000000ff287435 */\n"
            "/*0090*/   HFMA2.MMA R21, -RZ, RZ, 0, 4.76837158203125e-07 ;   /* 0x00000008ff157435 */")
    real = "/*0f50*/   HFMA2.MMA R2, R3, R4, R5 ;   /* 0x0000000000027435 */"
    assert kc.float_unit_ops(kc.opcodes(zero), zero) == []
    assert kc.float_unit_ops(kc.opcodes(zero)) == ["HFMA2.MMA"]  # without the text: counted
    both = zero + "\n" + real
    assert kc.float_unit_ops(kc.opcodes(both), both) == ["HFMA2.MMA"]
    assert kc.float_unit_ops(kc.opcodes(real), real) == ["HFMA2.MMA"]


def test_constants_match_the_reference():
    src = kc.ILLM_SOURCE.read_text()

    def const(name):
        return int(re.search(rf"constexpr (?:int|long long) {name} = (\d+)", src).group(1))

    assert const("EXP_A") == ri.EXP_A and 65536 - const("EXP_A") == ri.EXP_B
    assert (const("LOG2E_M"), const("LOG2E_K")) == ri.LOG2E
    assert (const("MANT"), const("EXP_F"), const("PROB_BITS")) == (ri.MANT, ri.EXP_F, ri.PROB_BITS)
    assert const("CLIP_BITS") == ri.CLIP_BITS
    assert const("WIDE_QMAX") == ri.WIDE_QMAX and const("ATTN_MAX_D") == ATTN_MAX_D
    assert re.search(r"constexpr long long NO_EXPONENT = 1LL << (\d+);", src).group(1) == str(ri.NO_EXPONENT.bit_length() - 1)


@pytest.mark.skipif(not kc.nvrtc_available(), reason="libnvrtc not found")
def test_nvrtc_compiles_the_nested_includes():
    joined = kc.kernel_source(kc.ILLM_SOURCE)
    assert not re.search(r"^\s*#\s*include", joined, flags=re.M) and all(f"namespace {ns}" in joined for ns in ("qk", "quik", "illm"))
    assert "extern \"C\" __global__ void __launch_bounds__(quik::THREADS, 1) NAME" not in joined  # no other family's entries
    cubin, log = kc.nvrtc_compile("sm_90", source=kc.ILLM_SOURCE)
    assert len(cubin) > 0
