"""Build checks of the native-layout W4A8 CUDA kernels (w4a8_gemm.cu) without a GPU, on the cubins
the launcher loads (launch.build; nvcc for every source and arch is in test_kernels_families.py):
ptxas spills nothing, and the SASS uses int8 tensor cores (IMMA), no FMA, no local memory.

Skips only without nvcc.  The SASS checks need cuobjdump + nvdisasm (pip wheels
nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm work; qconvert_kernels.compile finds them).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from qconvert_kernels import compile as kc
from qconvert_kernels.w4a8 import cuda as kcuda

pytestmark = pytest.mark.skipif(kc.nvcc_path() is None, reason="nvcc not found")

ARCHS = kc.ARCHS


def compile_all(out_dir, archs, source=kc.SOURCE) -> dict:
    """{arch: (ptxas report parsed, {kernel: SASS} or None)}, each arch built once, in parallel: the
    exact cubins the launchers load (launch.build, NVRTC, cached on disk and shared with
    tests/test_kernels_families.py), or nvcc's when NVRTC is missing."""
    from qconvert_kernels import launch

    def one(arch):
        if kc.nvrtc_available():
            path = launch.build(source, arch)
            return path, launch.build_log(path)
        path = kc.compile_cubin(arch, out_dir, source=source)
        return path, kc.ptxas_log(path)

    with ThreadPoolExecutor(len(archs)) as pool:
        built = dict(zip(archs, pool.map(one, archs)))
    have_sass = kc.cuobjdump_path() is not None
    return {a: (kc.parse_ptxas(log), kc.kernel_sass(kc.sass(path)) if have_sass else None) for a, (path, log) in built.items()}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return compile_all(tmp_path_factory.mktemp("cubins"), ARCHS)


def _sass(builds, arch):
    per_kernel = builds[arch][1]
    if per_kernel is None:
        if os.environ.get("CI"):  # CI installs them through the [test] extra: missing is a failure there
            pytest.fail("cuobjdump/nvdisasm not found in CI; the [test] extra should have installed them")
        pytest.skip("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    return per_kernel


@pytest.mark.parametrize("arch", ARCHS)
def test_ptxas_no_spills(builds, arch):
    report = builds[arch][0]
    assert set(kc.KERNELS) <= set(report), f"ptxas reported {sorted(report)}"
    for name in kc.KERNELS:
        r = report[name]
        assert (r["spill_stores"], r["spill_loads"], r["stack"]) == (0, 0, 0), (arch, name, r)
        assert r["registers"] <= 255, (arch, name, r)


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_kernels_present(builds, arch):
    assert set(_sass(builds, arch)) == set(kc.KERNELS)


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_gemms_use_imma(builds, arch):
    per_kernel = _sass(builds, arch)
    for name in kc.GEMM_KERNELS:
        ops = kc.opcodes(per_kernel[name])
        imma = {op: c for op, c in ops.items() if op.startswith("IMMA")}
        # 2 m16 x 4 n8 tiles per warp, 2 k steps per stage (unrolled): 16 x m16n8k32 s8
        assert imma == {"IMMA.16832.S8.S8": 16}, (arch, name, imma)


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_no_local_memory(builds, arch):
    per_kernel = _sass(builds, arch)
    for name in kc.KERNELS:
        assert kc.local_memory_ops(per_kernel[name]) == [], (arch, name)
        assert not re.search(r"\b(LDL|STL)\b", per_kernel[name]), (arch, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_gemms_have_no_fma(builds, arch):
    """Bit-exactness needs each float product and sum rounded on its own, as torch does."""
    per_kernel = _sass(builds, arch)
    for name in kc.GEMM_KERNELS:
        ops = kc.opcodes(per_kernel[name])
        assert not [op for op in ops if op.startswith(("FFMA", "HFMA", "DFMA"))], (arch, name)


def test_source_is_header_free_and_lists_its_kernels():
    """NVRTC gets no include path: the source includes no system header, only the family's own
    files, which kernel_source() inlines."""
    src = kc.SOURCE.read_text()
    assert not re.search(r"^\s*#\s*include\s*<", src, flags=re.M)
    assert not re.search(r"^\s*#\s*include", kc.kernel_source(kc.SOURCE), flags=re.M)
    entries = re.findall(r"^QK_\w+\((\w+),", src, flags=re.M)
    assert sorted(entries) == sorted(kc.KERNELS)


def test_exact_launcher_build_has_imma_and_no_local_memory():
    """The cubin the launcher loads (launch.build: NVRTC, no FTZ), not a look-alike."""
    from qconvert_kernels import launch

    if not (kc.nvrtc_available() or kc.nvcc_path()):
        pytest.skip("no NVRTC / nvcc")
    path = launch.build(kc.SOURCE, "sm_80")
    report = kc.parse_ptxas(launch.build_log(path))
    for name in kc.KERNELS:
        assert (report[name]["spill_stores"], report[name]["spill_loads"]) == (0, 0), (name, report[name])
    if kc.cuobjdump_path():
        per_kernel = kc.kernel_sass(kc.sass(path))
        for name in kc.GEMM_KERNELS:
            assert kc.opcodes(per_kernel[name]).get("IMMA.16832.S8.S8") == 16, name
            assert kc.local_memory_ops(per_kernel[name]) == [], name


# ---------------------------------------------------------------- launcher, CPU side


def test_import_without_cupy_and_available_never_raises():
    assert isinstance(kcuda.available(), bool)


@pytest.mark.parametrize("g", [16, 48, 100, 0])
def test_launcher_refuses_unsupported_group_size(g):
    m, n, kp = 3, 8, 192
    xq = torch.zeros((m, kp), dtype=torch.int8)
    qw = torch.zeros((n, kp // 2), dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"M={m}, N={n}, K={kp}, g={g}"):
        kcuda.w4a8_is_gemm(xq, torch.zeros(m), qw, torch.ones((n, 1), dtype=torch.int32), torch.ones(n), 0, g, torch.float16)
    with pytest.raises(ValueError, match=rf"M={m}, N={n}, K={kp}, g={g}"):
        kcuda.w4a8_fs_gemm(xq, torch.zeros(m), qw, torch.ones((n, 1), dtype=torch.float16), g, torch.float16)


def test_launcher_refuses_k_not_multiple_of_group():
    with pytest.raises(ValueError, match=r"M=2, N=8, K=96, g=64"):
        kcuda.check_gemm_shape("w4a8_is_gemm", 2, 8, 96, 64)
    for g in (32, 64, 96, 128, 256):
        kcuda.check_gemm_shape("w4a8_is_gemm", 1, 8, 4 * g, g)  # accepted


# ---------------------------------------------------------------- a CPU model of the kernel
# A line-by-line Python model of w4a8_gemm.cu's data movement (staging indices, the k
# permutation, the nibble unpack, the mma fragment layout written at the top of the source,
# the group fold and the epilogue mapping), checked against the reference.  It cannot prove
# the CUDA code right (only a GPU run can: tests/test_kernels_gpu.py), but it checks that the
# layout and permutation reasoning in the source's comments is self-consistent.  Keep in sync.

BM = BN = BK = 64
A_STRIDE, B_STRIDE, THREADS = 96, 48, 128
MASK = 0xFFFFFFFF


def _byte_perm(x: int, y: int, s: int) -> int:
    src = (x | (y << 32)).to_bytes(8, "little")
    return int.from_bytes(bytes(src[(s >> (4 * i)) & 7] for i in range(4)), "little")


def _unpack_int4x8(w: int) -> tuple[int, int]:
    u = w ^ 0x88888888
    lo, hi = u & 0x0F0F0F0F, (u >> 4) & 0x0F0F0F0F
    e0, e1 = _byte_perm(lo, hi, 0x5140), _byte_perm(lo, hi, 0x7362)
    return ((e0 + 0x78787878) & MASK) ^ 0x80808080, ((e1 + 0x78787878) & MASK) ^ 0x80808080


def _s8x4(r: int) -> list[int]:
    return [b - 256 if b >= 128 else b for b in r.to_bytes(4, "little")]


def _mma_m16n8k32(a, b, c):
    """PTX mma.m16n8k32.row.col.s32.s8.s8.s32 on 32 lanes' registers (the documented layout)."""
    A = [[0] * 32 for _ in range(16)]
    B = [[0] * 8 for _ in range(32)]
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        for i in range(16):  # a_i: row gid (+8 for i in 4..7, 12..15), col 4tig + i%4 (+16 for i >= 8)
            row = gid + (8 if (4 <= i < 8 or i >= 12) else 0)
            col = 4 * tig + (i & 3) + (16 if i >= 8 else 0)
            A[row][col] = _s8x4(a[lane][i // 4])[i % 4]
        for i in range(8):  # b_i: row 4tig + i%4 (+16 for i >= 4), col gid
            B[4 * tig + (i & 3) + (16 if i >= 4 else 0)][gid] = _s8x4(b[lane][i // 4])[i % 4]
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        for i in range(4):  # c_i: row gid (+8 for i >= 2), col 2tig + i%2
            r, col = gid + (8 if i >= 2 else 0), 2 * tig + (i & 1)
            c[lane][i] += sum(A[r][k] * B[k][col] for k in range(32))


def _model_is_acc(xq: torch.Tensor, qw: torch.Tensor, iscale: torch.Tensor, g: int) -> torch.Tensor:
    m_rows, kp = xq.shape
    n_rows = qw.shape[0]
    xb, qb = xq.view(torch.uint8).flatten().tolist(), qw.flatten().tolist()
    out = torch.zeros((m_rows, n_rows), dtype=torch.int64)
    G = kp // g
    for by in range(-(-m_rows // BM)):
        for bx in range(-(-n_rows // BN)):
            bm, bn = by * BM, bx * BN
            # per warp, per lane: P[mt][nt][4], acc[mt][nt][4]
            P = [[[[[0] * 4 for _ in range(4)] for _ in range(2)] for _ in range(32)] for _ in range(4)]
            acc = [[[[[0] * 4 for _ in range(4)] for _ in range(2)] for _ in range(32)] for _ in range(4)]
            step = group = 0
            for s in range(-(-kp // BK)):
                k0 = s * BK
                sA, sB = bytearray(BM * A_STRIDE), bytearray(BN * B_STRIDE)
                for tid in range(THREADS):
                    for i in range(2):
                        idx = tid + i * THREADS
                        row, col = idx // 4, (idx % 4) * 16
                        if bm + row < m_rows and k0 + col < kp:
                            o = (bm + row) * kp + k0 + col
                            sA[row * A_STRIDE + col: row * A_STRIDE + col + 16] = bytes(xb[o:o + 16])
                    row, col = tid // 2, (tid % 2) * 16
                    if bn + row < n_rows and k0 // 2 + col < kp // 2:
                        o = (bn + row) * (kp // 2) + k0 // 2 + col
                        sB[row * B_STRIDE + col: row * B_STRIDE + col + 16] = bytes(qb[o:o + 16])
                for ks in range(2):
                    for warp in range(4):
                        wm, wn = (warp >> 1) * 32, (warp & 1) * 32
                        a = [[[0] * 4 for _ in range(32)] for _ in range(2)]
                        b = [[[0] * 2 for _ in range(32)] for _ in range(4)]
                        for lane in range(32):
                            gid, tig = lane >> 2, lane & 3
                            word = lambda buf, off: int.from_bytes(buf[off:off + 4], "little")  # noqa: E731
                            for mt in range(2):
                                p = (wm + mt * 16 + gid) * A_STRIDE + ks * 32 + 8 * tig
                                a[mt][lane] = [word(sA, p), word(sA, p + 8 * A_STRIDE), word(sA, p + 4), word(sA, p + 8 * A_STRIDE + 4)]
                            for nt in range(4):
                                b[nt][lane] = list(_unpack_int4x8(word(sB, (wn + nt * 8 + gid) * B_STRIDE + ks * 16 + 4 * tig)))
                        for mt in range(2):
                            for nt in range(4):
                                c = [P[warp][lane][mt][nt] for lane in range(32)]
                                _mma_m16n8k32(a[mt], b[nt], c)
                    if k0 + ks * 32 >= kp:  # the zero half of the last stage does not count
                        continue
                    step += 1
                    if step == g // 32:
                        for warp in range(4):
                            wn = (warp & 1) * 32
                            for lane in range(32):
                                tig = lane & 3
                                for mt in range(2):
                                    for nt in range(4):
                                        for i in range(4):
                                            n = bn + wn + nt * 8 + 2 * tig + (i & 1)
                                            sc = int(iscale[n, group]) if n < n_rows else 0
                                            acc[warp][lane][mt][nt][i] += sc * P[warp][lane][mt][nt][i]
                                            P[warp][lane][mt][nt][i] = 0
                        step, group = 0, group + 1
            assert group == G
            for warp in range(4):
                wm, wn = (warp >> 1) * 32, (warp & 1) * 32
                for lane in range(32):
                    gid, tig = lane >> 2, lane & 3
                    for mt in range(2):
                        for nt in range(4):
                            for i in range(4):
                                m = bm + wm + mt * 16 + gid + (8 if i >= 2 else 0)
                                n = bn + wn + nt * 8 + 2 * tig + (i & 1)
                                if m < m_rows and n < n_rows:
                                    out[m, n] = acc[warp][lane][mt][nt][i]
    return out


def test_unpack_int4x8_model_decodes_nibbles_in_k_order():
    gen = torch.Generator().manual_seed(1)
    words = [0, MASK, 0x88888888, 0x77777777, 0x76543210, 0xFEDCBA98] + torch.randint(0, 2**31, (500,), generator=gen).tolist()
    for w in words:
        want = [((w >> (4 * i)) & 15) - (16 if (w >> (4 * i)) & 8 else 0) for i in range(8)]
        b0, b1 = _unpack_int4x8(w)
        assert _s8x4(b0) + _s8x4(b1) == want, hex(w)


@pytest.mark.parametrize("m,n,k,g", [(5, 72, 96, 32), (3, 16, 160, 64)])
def test_kernel_model_matches_reference_accumulator(m, n, k, g):
    from qconvert.formats.packing import pack_int4
    from qconvert_kernels.w4a8 import reference as ref

    gen = torch.Generator().manual_seed(m + n + k + g)
    kp = -(-k // g) * g
    q = torch.randint(-8, 8, (n, kp), generator=gen, dtype=torch.int8)
    q[:, k:] = 0
    xq = torch.randint(-127, 128, (m, kp), generator=gen, dtype=torch.int8)
    xq[:, k:] = 0
    iscale = torch.randint(1, 100, (n, kp // g), generator=gen, dtype=torch.int32)
    _, acc_ref = ref.w4a8_is_gemm(xq, torch.ones(m), q, iscale, torch.ones(n), 0, g, return_acc=True)
    assert torch.equal(_model_is_acc(xq, pack_int4(q), iscale, g), acc_ref.to(torch.int64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantizer_formula_matches_reference(dtype):
    """The kernel's quantizer arithmetic, emulated with correctly rounded float32 ops, equals the
    reference: inv = rn(rn(1 / amax) * 127) (torch's `127 / tensor` is reciprocal-then-multiply,
    not a division), t = rn(amax / 127), xq = clamp(rint(rn(x * inv)), -127, 127)."""
    from qconvert_kernels.w4a8 import reference as ref

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn((4096, 64), generator=gen) * torch.rand((4096, 1), generator=gen) * 100).to(dtype)
    x[0] = 0
    rn = lambda v: v.float()  # noqa: E731  (float64 -> float32: one rounding to nearest)
    xf = x.float()
    amax = xf.abs().amax(-1)
    inv = torch.where(amax > 0, rn(rn(1.0 / amax.double()).double() * 127.0), torch.zeros_like(amax))
    xq = torch.clamp(torch.round(rn(xf.double() * inv.double()[:, None])), -127, 127).to(torch.int8)
    t = rn(amax.double() / 127.0)
    xq_ref, t_ref = ref.quantize_per_token_int8(x)
    assert torch.equal(xq, xq_ref) and torch.equal(t, t_ref)
    # and the correctly rounded quotient 127 / amax would NOT match everywhere:
    inv_div = torch.where(amax > 0, rn(127.0 / amax.double()), torch.zeros_like(amax))
    assert not torch.equal(inv_div, inv)
