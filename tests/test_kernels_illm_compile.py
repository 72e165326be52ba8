"""Build checks of the I-LLM CUDA kernels (illm_gemm.cu) without a GPU: nvcc compiles them for
sm_80, sm_89 and sm_90 without spills or local memory, the GEMMs use the int8 tensor cores, and
no kernel does float arithmetic: the only float-unit instructions are those of nvcc's exact
integer-division routine (a reciprocal estimate refined in integers).  The constants written in
the source are the reference's."""

from __future__ import annotations

import re

import pytest

from qconvert_kernels import compile as kc
from qconvert_kernels.illm import reference as ri
from test_kernels_compile import _sass, compile_all

pytestmark = pytest.mark.skipif(kc.nvcc_path() is None, reason="nvcc not found")

ARCHS = kc.ARCHS
# integer division: I2F.U32.RP / I2F.U64.RP, MUFU.RCP(64H), F2I...TRUNC; FLO is find-leading-one (integer)
DIVISION = re.compile(r"^(I2F\.U(32|64)\.RP|MUFU\.RCP(64H)?|F2I(\.FTZ)?\.U(32|64)\.TRUNC(\.NTZ)?|FLO\.U(32|64)(\.SH)?)$")


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
        floaty = [op for op in ops if op.startswith(("F", "H", "D", "MUFU", "I2F")) and not DIVISION.match(op)]
        assert floaty == [], (arch, name, floaty)


def test_constants_match_the_reference():
    src = kc.ILLM_SOURCE.read_text()

    def const(name):
        return int(re.search(rf"constexpr (?:int|long long) {name} = (\d+)", src).group(1))

    assert const("EXP_A") == ri.EXP_A and 65536 - const("EXP_A") == ri.EXP_B
    assert (const("LOG2E_M"), const("LOG2E_K")) == ri.LOG2E
    assert (const("MANT"), const("EXP_F"), const("PROB_BITS")) == (ri.MANT, ri.EXP_F, ri.PROB_BITS)


@pytest.mark.skipif(not kc.nvrtc_available(), reason="libnvrtc not found")
def test_nvrtc_compiles_the_nested_includes():
    joined = kc.kernel_source(kc.ILLM_SOURCE)
    assert "#include" not in joined and all(f"namespace {ns}" in joined for ns in ("qk", "quik", "illm"))
    cubin, log = kc.nvrtc_compile("sm_90", source=kc.ILLM_SOURCE)
    assert len(cubin) > 0
