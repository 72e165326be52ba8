"""Build checks of the ZeroQuant-FP CUDA kernels (fp8_gemm.cu) without a GPU: nvcc compiles them
for sm_89 and sm_90 and refuses sm_80, ptxas spills nothing, the SASS holds the tensor-core
instructions expected on each arch and no local memory; plus a CPU model of the FP4 -> FP8
widening and of the fragment / k-permutation reasoning written in the source.

Skips only without nvcc; the SASS checks need cuobjdump + nvdisasm (see test_kernels_compile.py,
whose helpers are reused here).
"""

from __future__ import annotations

import re
import pytest
import torch

from qconvert_kernels import compile as kc
from qconvert_kernels.fp8 import cuda as cuda_fp8
from qconvert_kernels.fp8 import reference as ref8
from test_kernels_compile import _byte_perm, _sass, compile_all

pytestmark = pytest.mark.skipif(kc.nvcc_path() is None, reason="nvcc not found")

ARCHS = kc.FP8_ARCHS
# What the 16 FP8 mma of a stage (2 m16 x 4 n8 tiles per warp, 2 k steps) become in SASS:
# sm_89 has FP8 tensor cores for mma.sync (QMMA); on sm_90 ptxas widens E4M3 to fp16 and issues
# two fp16 HMMA per FP8 mma (Hopper's FP8 units are reached by wgmma only).
EXPECTED_MMA = {"sm_89": {"QMMA.16832.F32.E4M3.E4M3": 16}, "sm_90": {"HMMA.16816.F32": 32}}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return compile_all(tmp_path_factory.mktemp("fp8-cubins"), ARCHS, kc.FP8_SOURCE)


@pytest.mark.parametrize("arch", ARCHS)
def test_ptxas_no_spills(builds, arch):
    report = builds[arch][0]
    assert set(kc.FP8_KERNELS) <= set(report), f"ptxas reported {sorted(report)}"
    for name in kc.FP8_KERNELS:
        r = report[name]
        assert (r["spill_stores"], r["spill_loads"], r["stack"]) == (0, 0, 0), (arch, name, r)
        assert r["registers"] <= 255, (arch, name, r)


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_kernels_present_and_fp8_mma(builds, arch):
    per_kernel = _sass(builds, arch)
    assert set(per_kernel) == set(kc.FP8_KERNELS)
    for name in kc.FP8_GEMM_KERNELS:
        ops = kc.opcodes(per_kernel[name])
        mma = {op: c for op, c in ops.items() if "MMA" in op}
        assert mma == EXPECTED_MMA[arch], (arch, name, mma)
        if arch == "sm_90":  # the exact E4M3 -> fp16 widening that feeds HMMA
            assert ops.get("F2FP.F16.E4M3.UNPACK_B", 0) > 0, (arch, name)
    for name in kc.FP8_QUANT_KERNELS:  # the quantizer converts with the saturating E4M3 cvt
        assert any(op.startswith("F2FP.SATFINITE.E4M3") for op in kc.opcodes(per_kernel[name])), (arch, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_no_local_memory_and_no_fma_in_gemms(builds, arch):
    per_kernel = _sass(builds, arch)
    for name in kc.FP8_KERNELS:
        assert kc.local_memory_ops(per_kernel[name]) == [], (arch, name)
        assert not re.search(r"\b(LDL|STL)\b", per_kernel[name]), (arch, name)
    for name in kc.FP8_GEMM_KERNELS:
        ops = kc.opcodes(per_kernel[name])
        assert not [op for op in ops if op.startswith(("FFMA", "HFMA", "DFMA"))], (arch, name)


def test_sm80_is_refused_at_compile_time(tmp_path):
    with pytest.raises(kc.CompileError, match="needs sm_89 or newer"):
        kc.compile_cubin("sm_80", tmp_path, source=kc.FP8_SOURCE)


def test_source_is_header_free_and_lists_its_kernels():
    src = kc.FP8_SOURCE.read_text()
    assert not re.search(r"^\s*#\s*include\s*<", src, flags=re.M)
    assert not re.search(r"^\s*#\s*include", kc.kernel_source(kc.FP8_SOURCE), flags=re.M)
    assert sorted(re.findall(r"^ZQ_\w+\((\w+),", src, flags=re.M)) == sorted(kc.FP8_KERNELS)


@pytest.mark.skipif(not kc.nvrtc_available(), reason="libnvrtc not found (pip install nvidia-cuda-nvrtc)")
def test_exact_launcher_build(tmp_path):
    """The cubin the launcher loads (launch.build: NVRTC, no FTZ)."""
    from qconvert_kernels import launch

    path = launch.build(kc.FP8_SOURCE, "sm_89")
    report = kc.parse_ptxas(launch.build_log(path))
    for name in kc.FP8_KERNELS:
        assert (report[name]["spill_stores"], report[name]["spill_loads"]) == (0, 0), (name, report[name])
    if kc.cuobjdump_path():
        per_kernel = kc.kernel_sass(kc.sass(path))
        for name in kc.FP8_GEMM_KERNELS:
            assert kc.opcodes(per_kernel[name]).get("QMMA.16832.F32.E4M3.E4M3") == 16, name


# ---------------------------------------------------------------- launcher, CPU side


def test_launcher_refuses_sm80_and_bad_shapes(monkeypatch):
    monkeypatch.setattr(cuda_fp8, "_capability", lambda index=0: 80)
    with pytest.raises(ValueError, match=r"compute capability 8\.9 or newer.*sm_80"):
        cuda_fp8.check_device("model.layers.0.mlp.up_proj", 0)
    monkeypatch.setattr(cuda_fp8, "_capability", lambda index=0: 90)
    cuda_fp8.check_device("x", 0)
    assert isinstance(cuda_fp8.available(), bool)
    xq = torch.zeros((3, 192), dtype=torch.float8_e4m3fn)
    qw = torch.zeros((8, 96), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"M=3, N=8, K=192, g=48"):
        cuda_fp8.fp4_fp8_gemm(xq, torch.zeros(3), qw, torch.zeros((8, 4), dtype=torch.int8), torch.ones(8), 48, torch.float16)
    with pytest.raises(ValueError, match=r"M=2, N=8, K=96, g=64"):
        cuda_fp8.check_gemm_shape("fp4_fp8_gemm", 2, 8, 96, 64)


# ---------------------------------------------------------------- a CPU model of the kernel
# The widening fp4x8_to_e4m3 line by line, and one warp's k step (shared-memory addressing, the
# k permutation, the fragment layout at the top of fp8_gemm.cu) checked against the reference.
# It cannot prove the CUDA code right (only tests/test_kernels_fp8_gpu.py on a GPU can); it
# checks that the reasoning written in the source is self-consistent.  Keep in sync.

MASK = 0xFFFFFFFF


def _fp4x8_to_e4m3(w: int) -> tuple[int, int]:
    t_lo, t_hi = 0x3C383000, 0x4C484440
    lo, hi = w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F
    e0, e1 = _byte_perm(lo, hi, 0x5140), _byte_perm(lo, hi, 0x7362)
    b0 = _byte_perm(t_lo, t_hi, w & 0x7777) | ((e0 << 4) & 0x80808080)
    b1 = _byte_perm(t_lo, t_hi, (w >> 16) & 0x7777) | ((e1 << 4) & 0x80808080)
    return b0 & MASK, b1 & MASK


def test_fp4_widening_model_matches_the_reference_codebook():
    gen = torch.Generator().manual_seed(1)
    words = [0, MASK, 0x88888888, 0x76543210, 0xFEDCBA98] + torch.randint(0, 2**31, (2000,), generator=gen).tolist()
    for w in words:
        codes = torch.tensor([(w >> (4 * i)) & 15 for i in range(8)], dtype=torch.uint8)
        want = ref8.e2m1_to_e4m3_bits(codes).tolist()
        b0, b1 = _fp4x8_to_e4m3(w)
        assert list(b0.to_bytes(4, "little")) + list(b1.to_bytes(4, "little")) == want, hex(w)


def _e4m3(byte_list) -> torch.Tensor:
    return torch.tensor(byte_list, dtype=torch.uint8).view(torch.float8_e4m3fn).double()


def _random_e4m3(shape, gen) -> torch.Tensor:
    """uint8 E4M3 bytes, any finite value of either sign (0x7F / 0xFF are NaN)."""
    return torch.randint(0, 0x7F, shape, generator=gen, dtype=torch.uint8) | (torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8) << 7)


@pytest.mark.parametrize("fp4", [True, False])
def test_warp_k_step_model_matches_the_reference(fp4):
    """One warp, one 32-wide k step of fp4_fp8_gemm / fp8_fp8_gemm: registers built as the source
    builds them, multiplied with the documented m16n8k32 layout, equal the direct sum over those 32 k."""
    gen = torch.Generator().manual_seed(2)
    a_bytes = _random_e4m3((16, 32), gen)
    codes = torch.randint(0, 16, (8, 32), generator=gen, dtype=torch.uint8)  # 8 weight rows (n), 32 k
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [8, 16] bytes, low nibble = even k
    w8 = _random_e4m3((8, 32), gen)
    A = torch.zeros(16, 32, dtype=torch.float64)
    B = torch.zeros(32, 8, dtype=torch.float64)
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        row = lambda r: a_bytes[r, 8 * tig: 8 * tig + 8].tolist()  # noqa: E731  (64-bit load of 8 real k)
        lo, hi = row(gid), row(gid + 8)
        a = [lo[:4], hi[:4], lo[4:], hi[4:]]  # a0 = lo.x, a1 = hi.x, a2 = lo.y, a3 = hi.y
        if fp4:  # one 32-bit load of 8 packed codes, widened
            w = int.from_bytes(bytes(packed[gid, 4 * tig: 4 * tig + 4].tolist()), "little")
            b0, b1 = _fp4x8_to_e4m3(w)
            b = [list(b0.to_bytes(4, "little")), list(b1.to_bytes(4, "little"))]
        else:  # one 64-bit load of 8 E4M3 weights of row gid: b0 = w.x, b1 = w.y
            wrow = w8[gid, 8 * tig: 8 * tig + 8].tolist()
            b = [wrow[:4], wrow[4:]]
        for i in range(4):  # PTX layout: a_i rows gid / gid+8, mma k 4tig + j (+16 for a2, a3)
            r = gid + (8 if i in (1, 3) else 0)
            A[r, (16 if i >= 2 else 0) + 4 * tig: (16 if i >= 2 else 0) + 4 * tig + 4] = _e4m3(a[i])
        for i in range(2):  # b_i: mma k 4tig + j (+16 for b1), column gid
            B[(16 if i else 0) + 4 * tig: (16 if i else 0) + 4 * tig + 4, gid] = _e4m3(b[i])
    got = A @ B  # [16, 8], the mma's exact value
    wvals = ref8.e2m1_codebook().double()[codes.long()] if fp4 else w8.view(torch.float8_e4m3fn).double()
    want = a_bytes.view(torch.float8_e4m3fn).double() @ wvals.T
    assert torch.equal(got, want)
