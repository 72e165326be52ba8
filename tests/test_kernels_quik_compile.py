"""Build checks of the QUIK CUDA kernels (quik_gemm.cu) without a GPU: nvcc compiles them for
sm_80, sm_89 and sm_90, ptxas spills nothing, the SASS holds the tensor-core instructions each
path is meant to use (int4 IMMA on sm_80 / sm_89; on sm_90 the s4 mma is emulated, which is why
the launcher takes the int8 path there), no local memory and no FMA contraction in the GEMMs;
NVRTC compiles the joined source as cupy does; plus a CPU model of the byte-level fragment
argument written in the source, and the launcher's shape checks.
"""

from __future__ import annotations

import re
import pytest
import torch

from qconvert_kernels import compile as kc
from qconvert_kernels.quik import cuda as cuda_quik
from test_kernels_compile import _sass, compile_all

pytestmark = pytest.mark.skipif(kc.nvcc_path() is None, reason="nvcc not found")

ARCHS = kc.ARCHS
S8_GEMMS = tuple(k for k in kc.QUIK_GEMM_KERNELS if k not in kc.QUIK_S4_KERNELS)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return compile_all(tmp_path_factory.mktemp("quik-cubins"), ARCHS, kc.QUIK_SOURCE)


@pytest.mark.parametrize("arch", ARCHS)
def test_ptxas_no_spills(builds, arch):
    report = builds[arch][0]
    assert set(kc.QUIK_KERNELS) <= set(report), f"ptxas reported {sorted(report)}"
    for name in kc.QUIK_KERNELS:
        r = report[name]
        assert (r["spill_stores"], r["spill_loads"], r["stack"]) == (0, 0, 0), (arch, name, r)


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_tensor_core_path_per_arch(builds, arch):
    per_kernel = _sass(builds, arch)
    assert set(kc.QUIK_KERNELS) <= set(per_kernel)
    for name in S8_GEMMS:  # 2 m16 x 4 n8 tiles x 2 k steps per stage
        mma = {op: c for op, c in kc.opcodes(per_kernel[name]).items() if "MMA" in op}
        assert mma == {"IMMA.16832.S8.S8": 16}, (arch, name, mma)
    for name in kc.QUIK_S4_KERNELS:
        ops = kc.opcodes(per_kernel[name])
        if arch in kc.INT4_MMA_ARCHS:
            assert {op: c for op, c in ops.items() if "MMA" in op} == {"IMMA.16864.S4.S4": 16}, (arch, name)
        else:  # Hopper: no int4 tensor-core instruction; ptxas expands the s4 mma into other code
            assert not any(op.startswith("IMMA.16864") for op in ops), (arch, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_no_local_memory_and_no_fma_in_gemms(builds, arch):
    per_kernel = _sass(builds, arch)
    for name in kc.QUIK_KERNELS:
        assert kc.local_memory_ops(per_kernel[name]) == [], (arch, name)
    for name in kc.QUIK_GEMM_KERNELS:  # (the split kernels' FFMA are the IEEE division / reciprocal sequences)
        ops = kc.opcodes(per_kernel[name])
        assert not [op for op in ops if op.startswith(("FFMA", "HFMA", "DFMA"))], (arch, name)


def test_source_includes_the_shared_headers_and_lists_its_kernels():
    src = kc.QUIK_SOURCE.read_text()
    assert re.findall(r'^#include "([\w./]+)"', src, flags=re.M) == ["../common.cuh", "../w4a8/w4a8_mainloop.cuh",
                                                                      "quik_mainloop.cuh"]
    names = re.findall(r"^QUIK_\w+\((\w+),", src, flags=re.M)
    assert sorted(names) == sorted(kc.QUIK_KERNELS)
    joined = kc.kernel_source(kc.QUIK_SOURCE)
    assert not re.search(r"^\s*#\s*include", joined, flags=re.M) and "namespace qk" in joined and "namespace quik" in joined


@pytest.mark.skipif(not kc.nvrtc_available(), reason="libnvrtc not found (pip install nvidia-cuda-nvrtc)")
def test_exact_launcher_build_of_the_joined_source(tmp_path):
    """The cubin the launcher loads (launch.build: NVRTC, includes inlined, no FTZ)."""
    from qconvert_kernels import launch

    path = launch.build(kc.QUIK_SOURCE, "sm_89")
    report = kc.parse_ptxas(launch.build_log(path))
    for name in kc.QUIK_KERNELS:
        assert (report[name]["spill_stores"], report[name]["spill_loads"]) == (0, 0), (name, report[name])
    if kc.cuobjdump_path():
        per_kernel = kc.kernel_sass(kc.sass(path))
        assert kc.opcodes(per_kernel["quik_gemm_w4a4_s4_f16"]).get("IMMA.16864.S4.S4") == 16


def _nibbles(word: int) -> list[int]:
    return [((word >> (4 * i)) & 0xF) - 16 * (((word >> (4 * i)) & 0xF) >= 8) for i in range(8)]


def _bytes(word: int) -> list[int]:
    return [((word >> (8 * i)) & 0xFF) - 256 * (((word >> (8 * i)) & 0xFF) >= 128) for i in range(4)]


@pytest.mark.parametrize("s4", [True, False])
def test_byte_fragment_model_gives_the_plain_dot_products(s4):
    """One 32-byte k step of mainloop_bytes, modelled per lane: each thread's 8 contiguous bytes
    of rows gid / gid + 8 (A) and of column gid (B) go into the registers as the source says; the
    registers are then read back with the PTX fragment layout (m16n8k64 s4 / m16n8k32 s8) and
    multiplied as the mma does.  The result equals A Bᵀ over the real k."""
    gen = torch.Generator().manual_seed(3)
    lo, hi, per_byte = (-8, 8, 2) if s4 else (-128, 128, 1)
    kvals = 32 * per_byte
    a = torch.randint(lo, hi, (16, kvals), generator=gen)
    b = torch.randint(lo, hi, (8, kvals), generator=gen)

    def to_bytes(m):  # packed rows of 32 bytes (int4: low nibble = even k)
        if s4:
            v = (m[:, 0::2] & 0xF) | ((m[:, 1::2] & 0xF) << 4)
        else:
            v = m & 0xFF
        return v.tolist()

    ab, bb = to_bytes(a), to_bytes(b)

    def word(row, start):
        return int.from_bytes(bytes(row[start:start + 4]), "little")

    mma_a = torch.zeros(16, kvals, dtype=torch.long)
    mma_b = torch.zeros(kvals, 8, dtype=torch.long)
    elems = _nibbles if s4 else _bytes
    width = len(elems(0))  # elements per register: 8 (s4) or 4 (s8)
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        regs_a = [word(ab[gid], 8 * tig), word(ab[gid + 8], 8 * tig), word(ab[gid], 8 * tig + 4), word(ab[gid + 8], 8 * tig + 4)]
        regs_b = [word(bb[gid], 8 * tig), word(bb[gid], 8 * tig + 4)]
        for r, w in enumerate(regs_a):  # PTX: a0 / a1 rows gid / gid+8 at k = tig*width + i, a2 / a3 at + kvals/2
            row = gid + 8 * (r & 1)
            for i, v in enumerate(elems(w)):
                mma_a[row, (r >> 1) * (kvals // 2) + tig * width + i] = v
        for r, w in enumerate(regs_b):
            for i, v in enumerate(elems(w)):
                mma_b[r * (kvals // 2) + tig * width + i, gid] = v
    assert torch.equal(mma_a @ mma_b, a @ b.T)


def test_launcher_shape_checks():
    with pytest.raises(ValueError, match="multiple of 64"):
        cuda_quik.check_gemm_shape("layer", 4, 8, 96)
    with pytest.raises(ValueError, match="M too large"):
        cuda_quik.check_gemm_shape("layer", 64 * 65536, 8, 128)
    cuda_quik.check_gemm_shape("layer", 1, 8, 576 - 32 + 32)  # 576 = 544 base + 32 outliers -> Kbp 576
