"""Build checks of every kernel family, discovered (qconvert_kernels/<family>/__init__.py SOURCES),
on the exact cubins the launchers load: ``qconvert_kernels.launch.build`` (NVRTC, BUILD_OPTIONS:
no flush-to-zero) for each declared architecture.  For each: all declared entry points and no
others, no spills / stack / local memory, the declared tensor-core instructions, and no ``.FTZ``
instruction anywhere.  nvcc compiles every source for the same architectures too.

Skips without NVRTC / nvcc; the SASS checks need cuobjdump + nvdisasm (pip wheels; required in CI).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from qconvert_kernels import compile as kc
from qconvert_kernels import launch

SOURCES = kc.discover()
PAIRS = [(src, arch) for src in SOURCES for arch in src.archs]
IDS = [f"{src.name}-{arch}" for src, arch in PAIRS]

needs_nvrtc = pytest.mark.skipif(not kc.nvrtc_available(), reason="libnvrtc not found (pip install nvidia-cuda-nvrtc)")


def _sass_or_skip(path):
    if kc.cuobjdump_path() is None:
        if os.environ.get("CI"):
            pytest.fail("cuobjdump/nvdisasm not found in CI; the [test] extra should have installed them")
        pytest.skip("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    return kc.kernel_sass(kc.sass(path))


@pytest.fixture(scope="module")
def builds():
    """{(source name, arch): (cubin path, ptxas report, {kernel: SASS})}, built in parallel (and cached
    on disk by launch.build, so the per-family test files reuse these binaries)."""
    if not kc.nvrtc_available():
        pytest.skip("libnvrtc not found")
    with ThreadPoolExecutor(max(1, min(len(PAIRS), os.cpu_count() or 1))) as pool:
        paths = list(pool.map(lambda p: launch.build(p[0].path, p[1]), PAIRS))
    have_sass = kc.cuobjdump_path() is not None
    if not have_sass and os.environ.get("CI"):
        pytest.fail("cuobjdump/nvdisasm not found in CI: the unwritten-uniform-register check of nvcc's builds needs them")
    return {(src.name, arch): (path, kc.parse_ptxas(launch.build_log(path)), kc.kernel_sass(kc.sass(path)) if have_sass else None)
            for (src, arch), path in zip(PAIRS, paths)}


def test_discovery_finds_every_family_folder():
    names = {s.name for s in SOURCES}
    assert {"w4a8/w4a8_gemm.cu", "w4a8/w4a8_repacked.cu", "fp8/fp8_gemm.cu", "quik/quik_gemm.cu", "illm/illm_gemm.cu"} <= names
    for src in SOURCES:
        assert src.path.is_file() and set(src.gemms) <= set(src.kernels)
        text = kc.kernel_source(src.path)
        assert not re.search(r"^\s*#\s*include", text, flags=re.M), src.name  # NVRTC: everything inlined
        defined = set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(', text))
        assert defined <= {"NAME"} | set(src.kernels), (src.name, defined)


@needs_nvrtc
@pytest.mark.parametrize("src,arch", PAIRS, ids=IDS)
def test_exact_build_resources(builds, src, arch):
    path, report, _ = builds[(src.name, arch)]
    assert path.suffix == ".cubin" and launch.BUILD_OPTIONS[1:5] == ("--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--fmad=false")
    assert set(src.kernels) <= set(report), (src.name, arch, sorted(report))
    for name in src.kernels:
        r = report[name]
        assert (r["spill_stores"], r["spill_loads"], r["stack"]) == (0, 0, 0), (src.name, arch, name, r)
        assert r["registers"] <= 255, (arch, name, r)


@needs_nvrtc
@pytest.mark.parametrize("src,arch", PAIRS, ids=IDS)
def test_exact_build_sass(builds, src, arch):
    path, _, per_kernel = builds[(src.name, arch)]
    if per_kernel is None:
        _sass_or_skip(path)
    assert set(per_kernel) == set(src.kernels), (src.name, arch)  # a module carries its own family's kernels only
    for name in src.kernels:
        ops = kc.opcodes(per_kernel[name])
        assert kc.local_memory_ops(per_kernel[name]) == [], (arch, name)
        assert kc.unwritten_uniform_registers(per_kernel[name]) == [], (src.name, arch, name)
        assert not [op for op in ops if ".FTZ" in op], (src.name, arch, name, [op for op in ops if ".FTZ" in op])
        mma = {op: c for op, c in ops.items() if op.startswith(src.mma)}
        if src.uses_mma(name, arch):
            assert mma, (src.name, arch, name)
            want = src.mma_count.get(name, {}).get(arch)
            if want is not None:
                assert mma == want, (src.name, arch, name, mma)
        if name in src.no_float:
            assert kc.float_unit_ops(ops, per_kernel[name]) == [], (arch, name, kc.float_unit_ops(ops, per_kernel[name]))


def test_unwritten_uniform_register_detector_on_the_h200_build():
    """The whole SASS NVRTC built on an H200 for four decode kernels with an L2 cache-hint cp.async
    (tests/data/h200_decode_sass.txt.gz): the two kernels that faulted there with an illegal
    instruction read a memory descriptor from uniform registers nothing in the kernel wrote, at the
    very LDGSTS compute-sanitizer named; the two that ran read only written ones."""
    import gzip
    from pathlib import Path

    with gzip.open(Path(__file__).parent / "data" / "h200_decode_sass.txt.gz", "rt") as f:
        sass = kc.kernel_sass(f.read())
    assert sorted(sass) == sorted(["w4a8r_decode_fs_m16", "w4a8r_decode_is_m32", "w4a8r_decode_is_m8", "w4a8r_decode_is_m16"])
    for name, at in (("w4a8r_decode_fs_m16", "/*03f0*/"), ("w4a8r_decode_is_m32", "/*0450*/")):
        bad = kc.unwritten_uniform_registers(sass[name])
        faulting = next(line for line in sass[name].splitlines() if at in line)
        assert len(sass[name].splitlines()) > 2000  # the whole kernel (to its last NOP), not an excerpt
        assert "LDGSTS" in faulting and any(b in faulting for b in bad) and all("desc[UR1]" in b for b in bad), (name, bad)
    for name in ("w4a8r_decode_is_m8", "w4a8r_decode_is_m16"):
        text = sass[name]
        assert "desc[UR" in text and kc.unwritten_uniform_registers(text) == [], name
    # written pairs are accepted (ULDC.64, a .WIDE result, ELECT's uniform result), an unwritten half is not
    t = kc.unwritten_uniform_registers
    assert t("/*0000*/ ULDC.64 UR4, c[0x0][0x208] ;\n/*0010*/ LDG.E R0, desc[UR4][R2.64] ;") == []
    assert t("/*0000*/ UIMAD.WIDE.U32 UR4, UR6, UR8, URZ ;\n/*0010*/ LDG.E R0, [UR4.64] ;") == []
    assert t("/*0000*/ ELECT P0, UR4, PT ;\n/*0010*/ LDS R0, [UR4] ;") == []
    assert t("/*0000*/ UMOV UR4, 0x1 ;\n/*0010*/ LDG.E R0, desc[UR4][R2.64] ;") == ["LDG.E R0, desc[UR4][R2.64]"]
    assert t("/*0000*/ UMOV UR4, 0x1 ;\n/*0010*/ LDG.E R0, [UR4.64] ;") == ["LDG.E R0, [UR4.64]"]
    assert t("/*0000*/ ISETP.GE.AND P0, PT, R2, UR5, PT ;\n/*0010*/ LDG.E R0, [R2.64+UR5] ;") == ["LDG.E R0, [R2.64+UR5]"]


@needs_nvrtc
def test_decode_kernels_fit_two_ctas_per_sm(builds):
    """__launch_bounds__(256, 2): <= 128 registers, and the shared memory of two CTAs fits every arch."""
    from qconvert_kernels.w4a8 import cuda

    for arch in ("sm_80", "sm_89", "sm_90"):
        _, report, _ = builds[("w4a8/w4a8_repacked.cu", arch)]
        for mt8 in (1, 2, 4, 8):
            for v in ("is", "fs", "quik"):
                assert report[f"w4a8r_decode_{v}_m{8 * mt8}"]["registers"] <= 128
            assert cuda.decode_smem(mt8) <= 99 * 1024
    assert cuda.P_SMEM <= 99 * 1024  # sm_86 / sm_89 allow 99 KB per block


@needs_nvrtc
def test_bm64_prefill_kernels_fit_two_ctas_per_sm(builds):
    """The 64-token prefill tiles exist to put two CTAs (16 warps) on an SM where the 128-token ones,
    at about 218 registers, leave one: __launch_bounds__(256, 2) holds them to <= 128 registers with
    no spills, and two CTAs' shared memory fits sm_80's 164 KB and sm_90's 228 KB per SM."""
    from qconvert_kernels.w4a8 import cuda

    for arch in ("sm_80", "sm_89", "sm_90"):
        _, report, _ = builds[("w4a8/w4a8_repacked.cu", arch)]
        for v in ("is", "fs"):
            r = report[f"w4a8r_prefill_{v}_bm64"]
            assert r["registers"] <= 128 and (r["spill_stores"], r["stack"]) == (0, 0), (arch, v, r)
            assert report[f"w4a8r_prefill_{v}"]["registers"] > 128, (arch, v)  # else the variant buys nothing
    assert 2 * cuda.p_smem(64) <= 164 * 1024 and cuda.p_smem(64) == cuda.P_SMEM - 4 * 64 * 128


def test_decode_kernels_prefetch_their_scales(builds):
    """The repacked decode kernels prefetch their group scales into L2 (W4R_SCALE_AHEAD groups ahead of
    the one-group-ahead read): exactly two CCTL.E.PF2 (PTX prefetch.global.L2) in each, one before the
    group loop and one in a loop with the tensor-core instructions; the ZQ kernel of 64 rows has none
    (the prefetch made ptxas spill it at its 128 registers). All at <= 128 registers, no local memory."""
    if any(per_kernel is None for _, _, per_kernel in builds.values()):
        pytest.skip("cuobjdump/nvdisasm not found")
    found = 0
    for (name, arch), (_, report, per_kernel) in builds.items():
        if name not in ("w4a8/w4a8_repacked.cu", "fp8/fp8_repacked.cu"):
            continue
        for kernel, sass in per_kernel.items():
            if "_decode_" not in kernel:
                continue
            n = kc.opcodes(sass).get("CCTL.E.PF2", 0)
            in_mma_loop = any(ops.get("CCTL.E.PF2") and any(op.startswith(("IMMA", "HMMA", "QMMA")) for op in ops)
                              for _, _, ops in kc.loops(sass))
            if kernel == "w4a8r_decode_zq_m64":
                assert n == 0, (name, arch, kernel, n)
            else:
                assert n == 2 and in_mma_loop, (name, arch, kernel, n, in_mma_loop)
            r = report[kernel]
            assert r["registers"] <= 128 and r["stack"] == 0 and r["spill_stores"] == 0, (name, arch, kernel, r)
            found += 1
    assert found == 3 * 12 + 2 * 4, found   # sm_80 / 89 / 90 x 12 (IS, FS, QUIK x 4 widths); sm_89 / 90 x 4 (ZQ)


# The g = 128 prefill main loop (w4a8_repacked.cu, one iteration per k128 stage = one group, 64
# IMMA): instructions issued per IMMA, counted statically over the loop's SASS on the launchers'
# NVRTC builds.  At d316985 (before the stage-per-group loop) a g = 128 group took about 10.6 per
# IMMA along its path (nvcc 13.0, sm_90, counted by hand; docs/kernels.md).  Bounds, not targets:
# a change that brings address arithmetic or I2F back into the loop fails here.
PREFILL_LOOP_BOUND = {"w4a8r_prefill_is": 6.0, "w4a8r_prefill_fs": 7.0, "w4a8r_prefill_quik": 6.0}  # quik: the IS loop
# the 64-token tiles: 32 IMMA a group, the same fixed work per stage (7.7-8.6 per IMMA, 2026-12-06)
PREFILL_BM64_LOOP_BOUND = {"w4a8r_prefill_is_bm64": 8.5, "w4a8r_prefill_fs_bm64": 9.0}


def test_prefill_g128_main_loop_sass(builds):
    for arch in ("sm_80", "sm_89", "sm_90"):
        _, _, per_kernel = builds[("w4a8/w4a8_repacked.cu", arch)]
        if per_kernel is None:
            _sass_or_skip(None)
        for name, bound in {**PREFILL_LOOP_BOUND, **PREFILL_BM64_LOOP_BOUND}.items():
            nj = 4 if name.endswith("_bm64") else 8   # n8 token tiles per warp
            start, end, ops = kc.mma_loop(per_kernel[name], "IMMA")
            n_mma = sum(c for op, c in ops.items() if op.startswith("IMMA"))
            assert n_mma == 8 * nj, (arch, name, n_mma)
            assert sum(ops.values()) / n_mma <= bound, (arch, name, sum(ops.values()), dict(ops))
            assert not [op for op in ops if op.startswith(("I2F", "LDL", "STL"))], (arch, name, dict(ops))
            assert ops["BAR.SYNC.DEFER_BLOCKING"] == 1 and ops["LDS.64"] == 4 * nj and ops["LDS.128"] == 4, (arch, name, dict(ops))
    # the loop finder itself: a backward branch makes a loop, a forward one does not
    text = "/*0000*/ IMMA.16832.S8.S8 R0, R4, R8, R0 ;\n/*0010*/ @P0 BRA 0x30 ;\n/*0020*/ IADD3 R1, R1, 0x1, RZ ;\n/*0030*/ @!P1 BRA 0x0 ;"
    assert [(s, e, sum(o.values())) for s, e, o in kc.loops(text)] == [(0, 0x30, 4)]


GEMV_KERNELS = {"quik/quik_gemm.cu": ("quik_gemv_w8a8_f16", "quik_gemv_w8a8_bf16", "quik_gemv_w4a4_f16", "quik_gemv_w4a4_bf16"),
                "illm/illm_gemm.cu": ("illm_gemv_w8", "illm_gemv_w4")}


def test_the_gemvs_issue_a_steps_weight_loads_before_its_first_sum(builds):
    """quik_mainloop.cuh's gemv_sums loads GV_UNROLL steps of GV_COLS weight rows (8 x 16 bytes per
    lane) before it sums any: in the SASS, at least 8 LDG.E.128 come before the first IDP.4A, so a
    lane has 128 bytes in flight rather than waiting on each load.  (A version that clamped the
    index of a step past the row instead of predicating its load let ptxas sink the loads: 3.)"""
    for arch in ("sm_80", "sm_89", "sm_90"):
        for src, names in GEMV_KERNELS.items():
            _, _, per_kernel = builds[(src, arch)]
            if per_kernel is None:
                _sass_or_skip(None)
            for name in names:
                ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", per_kernel[name])]
                first = next(i for i, op in enumerate(ops) if op.startswith("IDP.4A"))
                assert sum(op.startswith("LDG.E.128") for op in ops[:first]) >= 8, (arch, name)


@needs_nvrtc
def test_ftz_detector_is_not_vacuous(tmp_path):
    """The same float code built with -ftz=true (what cupy.RawModule(code=...) appends) shows .FTZ
    instructions in its SASS; built with BUILD_OPTIONS it shows none."""
    src = tmp_path / "ftz.cu"
    src.write_text('extern "C" __global__ void k(const float* a, float* o) {\n'
                   '  o[threadIdx.x] = __fmul_rn(a[threadIdx.x], a[threadIdx.x + 32]) + a[threadIdx.x + 64];\n}\n')
    ok = launch.build(src, "sm_80")
    bad, _ = kc.nvrtc_compile_text("sm_80", src.read_text(), "ftz.cu", ("-std=c++17", "--ftz=true"))
    (tmp_path / "bad.cubin").write_bytes(bad)
    good_ops, bad_ops = kc.opcodes(_sass_or_skip(ok)["k"]), kc.opcodes(_sass_or_skip(tmp_path / "bad.cubin")["k"])
    assert not [op for op in good_ops if ".FTZ" in op]
    assert [op for op in bad_ops if ".FTZ" in op]


def test_launchers_load_the_built_cubin_not_source(monkeypatch, tmp_path):
    """module() hands cupy a path (RawModule(path=...)), never code=, so no -ftz=true is appended."""
    calls = []

    class FakeModule:
        def __init__(self, **kw):
            calls.append(kw)

    class FakeCupy:
        RawModule = FakeModule

        class cuda:  # noqa: N801
            class Device:
                def __init__(self, i=0):
                    self.compute_capability = "80"

                def __enter__(self):
                    return self

                def __exit__(self, *a):
                    return False

    monkeypatch.setattr(launch, "_cupy", lambda: FakeCupy)
    monkeypatch.setattr(launch, "build", lambda source, arch, options=launch.BUILD_OPTIONS: tmp_path / f"{source.name}.{arch}.cubin")
    launch.module.cache_clear()
    try:
        for src in SOURCES:
            launch.module(src.path, 0)
    finally:
        launch.module.cache_clear()
    assert calls and all(set(c) == {"path"} and c["path"].endswith(".sm_80.cubin") for c in calls)


@pytest.mark.skipif(kc.nvcc_path() is None, reason="nvcc not found")
def test_nvcc_compiles_every_source(tmp_path):
    """The machine's nvcc builds every discovered source for its architectures (ARCHITECTURE.md),
    and no kernel of those builds reads memory through a uniform register nothing wrote (another
    compiler than the launchers' NVRTC: nvcc 13.0 made that fault out of the decode kernels' cache
    hint where this NVRTC did not)."""
    have_sass = kc.cuobjdump_path() is not None
    if not have_sass and os.environ.get("CI"):
        pytest.fail("cuobjdump/nvdisasm not found in CI: the unwritten-uniform-register check of nvcc's builds needs them")

    def one(pair):
        src, arch = pair
        cubin = kc.compile_cubin(arch, tmp_path / arch / src.family, source=src.path)
        return src, arch, kc.parse_ptxas(kc.ptxas_log(cubin)), kc.kernel_sass(kc.sass(cubin)) if have_sass else None

    with ThreadPoolExecutor(max(1, min(len(PAIRS), os.cpu_count() or 1))) as pool:
        for src, arch, report, per_kernel in pool.map(one, PAIRS):
            assert set(src.kernels) <= set(report), (src.name, arch)
            for name in src.kernels if per_kernel is not None else ():
                assert kc.unwritten_uniform_registers(per_kernel[name]) == [], (src.name, arch, name)
