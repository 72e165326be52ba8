"""Offline build checks of the W4A8 CUDA kernels: nvcc / NVRTC compile, SASS, ptxas resources.

None of this needs a GPU.  tests/test_kernels_compile.py uses it in CI, and it doubles as a
check script on a GPU machine::

    python -m qconvert_kernels.compile sm_80 sm_89 sm_90      # ptxas resources + SASS summary
                                                              # (fp8_gemm.cu too on sm_89 / sm_90)

Tools:
  nvcc       the CUDA toolkit's compiler (``shutil.which``, then ``$CUDA_HOME/bin``).
  cuobjdump  SASS disassembler; it runs ``nvdisasm`` and needs it on PATH.  Looked up on PATH,
             beside nvcc, then in the pip wheels ``nvidia-cuda-cuobjdump`` and
             ``nvidia-cuda-nvdisasm`` (``nvidia/cu13/bin``).
  libnvrtc   the runtime compiler CuPy uses (pip ``nvidia-cuda-nvrtc``), optional: compiles the
             source exactly as ``cupy.RawModule`` will, without a GPU.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).parent / "w4a8" / "w4a8_gemm.cu"
ARCHS = ("sm_80", "sm_89", "sm_90")
GEMM_KERNELS = ("w4a8_is_gemm_f16", "w4a8_is_gemm_bf16", "w4a8_fs_gemm_f16", "w4a8_fs_gemm_bf16")
QUANT_KERNELS = ("quantize_per_token_int8_f16", "quantize_per_token_int8_bf16")
KERNELS = GEMM_KERNELS + QUANT_KERNELS
NVCC_FLAGS = ("-O3", "-std=c++17", "-Xptxas", "-v")

# ZeroQuant-FP kernels (fp8_gemm.cu): FP8 mma exists from sm_89 on; compiling for sm_80 stops at
# the source's #error.  compile_cubin / nvrtc_compile / sass take ``source=FP8_SOURCE``.
FP8_SOURCE = Path(__file__).parent / "fp8" / "fp8_gemm.cu"
FP8_ARCHS = ("sm_89", "sm_90")
FP8_GEMM_KERNELS = ("fp4_fp8_gemm_f16", "fp4_fp8_gemm_bf16", "fp8_fp8_gemm_f16", "fp8_fp8_gemm_bf16")
FP8_QUANT_KERNELS = ("quantize_per_token_fp8_f16", "quantize_per_token_fp8_bf16")
FP8_KERNELS = FP8_GEMM_KERNELS + FP8_QUANT_KERNELS

# QUIK kernels (quik_gemm.cu, which includes w4a8_gemm.cu): every arch.  The int4 x int4 GEMM
# (``_s4``) runs on sm_80 / sm_89 only: on sm_90 ptxas emulates its s4 mma, so the launcher
# takes the ``_s8`` path there; the report checks the s4 mma on the archs that have it.
QUIK_SOURCE = Path(__file__).parent / "quik" / "quik_gemm.cu"
QUIK_S4_KERNELS = ("quik_gemm_w4a4_s4_f16", "quik_gemm_w4a4_s4_bf16")
QUIK_GEMM_KERNELS = QUIK_S4_KERNELS + ("quik_gemm_w4a4_s8_f16", "quik_gemm_w4a4_s8_bf16",
                                       "quik_gemm_w8a8_f16", "quik_gemm_w8a8_bf16")
QUIK_KERNELS = QUIK_GEMM_KERNELS + ("quik_split_f16", "quik_split_bf16")
INT4_MMA_ARCHS = ("sm_80", "sm_86", "sm_89")

# I-LLM kernels (illm_gemm.cu, which includes quik_gemm.cu): every arch, integer arithmetic only.
ILLM_SOURCE = Path(__file__).parent / "illm" / "illm_gemm.cu"
ILLM_GEMM_KERNELS = ("illm_matmul_w8", "illm_matmul_w4")
ILLM_KERNELS = ILLM_GEMM_KERNELS + ("illm_requant_rows", "illm_softmax", "illm_rmsnorm")
_INCLUDE = re.compile(r'^#include "([\w./]+)"\s*$', re.M)


def kernel_source(source: Path = SOURCE) -> str:
    """The text of a kernel source with its ``#include "x.cu"`` lines (files beside it) inlined,
    recursively, for NVRTC, which gets no include path (nvcc resolves them itself)."""
    source = Path(source)
    return _INCLUDE.sub(lambda m: kernel_source(source.parent / m.group(1)), source.read_text())


class CompileError(RuntimeError):
    """nvcc / NVRTC / cuobjdump failed; the message carries the tool's output."""


def _check_arch(arch: str) -> str:
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    return arch


def _pip_cuda_dirs(sub: str) -> list[Path]:
    """``nvidia/cu*/<sub>`` folders of the NVIDIA pip wheels, newest CUDA first."""
    out = []
    for entry in sys.path:
        base = Path(entry or ".") / "nvidia"
        if base.is_dir():
            out += sorted((p / sub for p in base.glob("cu*") if (p / sub).is_dir()), reverse=True)
    return out


def _find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    dirs = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(Path(nvcc).resolve().parent)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "bin")
    dirs += sorted(Path("/usr/local").glob("cuda*/bin"), reverse=True)
    dirs += _pip_cuda_dirs("bin")
    for d in dirs:
        cand = d / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def nvcc_path() -> str | None:
    """The nvcc to use, or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return None


def cuobjdump_path() -> str | None:
    """cuobjdump, usable only if nvdisasm is found too (cuobjdump -sass runs it); else None."""
    cuobjdump, nvdisasm = _find_tool("cuobjdump"), _find_tool("nvdisasm")
    return cuobjdump if cuobjdump and nvdisasm else None


def compile_cubin(arch: str, out_dir, source: Path = SOURCE, extra_flags=()) -> Path:
    """``nvcc -cubin -arch=<arch> -O3 -std=c++17 -Xptxas -v`` of the kernel source.

    Returns the cubin path ``out_dir/w4a8_gemm.<arch>.cubin``; ptxas' report (stderr) is kept
    beside it as ``.ptxas.log`` (read it with ``ptxas_log``).  Raises CompileError on failure.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise CompileError("nvcc not found (PATH, CUDA_HOME)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cubin = out_dir / f"{Path(source).stem}.{_check_arch(arch)}.cubin"
    cmd = [nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, *extra_flags, "-o", str(cubin), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    cubin.with_suffix(".ptxas.log").write_text(proc.stdout + proc.stderr)
    return cubin


def ptxas_log(cubin) -> str:
    """The ptxas -v report written by ``compile_cubin`` for this cubin."""
    return Path(cubin).with_suffix(".ptxas.log").read_text()


_PTXAS_ENTRY = re.compile(r"Function properties for (\S+)\s*\n[^\n]*?(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Compiling entry function '(\S+)'.*?Used (\d+) registers(?:.*?(\d+) bytes smem)?", re.S)


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v report -> {kernel: {stack, spill_stores, spill_loads, registers, smem}}."""
    out: dict[str, dict[str, int]] = {}
    for name, stack, st, ld in _PTXAS_ENTRY.findall(log):
        out.setdefault(name, {}).update(stack=int(stack), spill_stores=int(st), spill_loads=int(ld))
    for chunk in re.split(r"(?=ptxas info\s+: Compiling entry function)", log):
        m = _PTXAS_USED.search(chunk)
        if m:
            out.setdefault(m.group(1), {}).update(registers=int(m.group(2)), smem=int(m.group(3) or 0))
    return out


def sass(cubin) -> str:
    """``cuobjdump -sass`` of a cubin (nvdisasm's folder put on PATH for it)."""
    cuobjdump = cuobjdump_path()
    if cuobjdump is None:
        raise CompileError("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(_find_tool("nvdisasm")).parent), str(Path(cuobjdump).parent), env.get("PATH", "")])
    proc = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or "fatal" in proc.stderr:
        raise CompileError(f"cuobjdump -sass {cubin} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def kernel_sass(sass_text: str) -> dict[str, str]:
    """Split ``cuobjdump -sass`` output into {kernel name: its SASS text}."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass_text, flags=re.M)
    return {name: body for name, body in zip(parts[1::2], parts[2::2])}


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def opcodes(kernel_text: str) -> collections.Counter:
    """Instruction mnemonics (with modifiers, e.g. ``IMMA.16832.S8.S8``) of one kernel's SASS."""
    return collections.Counter(_OPCODE.findall(kernel_text))


def local_memory_ops(kernel_text: str) -> list[str]:
    """The LDL / STL (local memory: spills or dynamically indexed arrays) instructions."""
    return [op for op in opcodes(kernel_text) if op.split(".")[0] in ("LDL", "STL")]


# ----------------------------------------------------------------------------- NVRTC


def _load_nvrtc():
    names = [ctypes.util.find_library("nvrtc")]
    for d in _pip_cuda_dirs("lib"):
        names += sorted(str(p) for p in d.glob("libnvrtc.so*"))
    for name in names:
        if not name:
            continue
        try:
            # libnvrtc dlopens libnvrtc-builtins by soname: load the one beside it first
            # (pip wheels are not on the loader's path), then dlopen finds it loaded.
            for builtins in sorted(Path(name).parent.glob("libnvrtc-builtins.so*")) if os.sep in name else ():
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def nvrtc_available() -> bool:
    return _load_nvrtc() is not None


def nvrtc_compile(arch: str, source: Path = SOURCE, options=("-std=c++17",)) -> tuple[bytes, str]:
    """Compile the source with NVRTC as ``cupy.RawModule(code=..., options=...)`` does, with
    no include path.  Returns (cubin bytes, NVRTC log); raises CompileError with the log."""
    lib = _load_nvrtc()
    if lib is None:
        raise CompileError("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    prog = ctypes.c_void_p()
    src = kernel_source(source).encode()

    def check(res, what):
        if res != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise CompileError(f"{what}: {lib.nvrtcGetErrorString(res).decode()}\n{log()}")

    def log() -> str:
        size = ctypes.c_size_t()
        if lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) != 0:
            return ""
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode(errors="replace")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src, Path(source).name.encode(), 0, None, None), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={_check_arch(arch)}", *options]
        arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        check(lib.nvrtcCompileProgram(prog, len(opts), arr), "nvrtcCompileProgram")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        buf = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
        return buf.raw, log()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ----------------------------------------------------------------------------- CLI


def _report(arch: str, cubin, kernels, gemms, mma_kind) -> bool:
    """Print ptxas resources and the SASS summary of ``kernels`` in ``cubin``; True if none
    spills, uses local memory, or (a GEMM) lacks tensor-core instructions whose opcode
    satisfies ``mma_kind``."""
    res = parse_ptxas(ptxas_log(cubin))
    per_kernel = kernel_sass(sass(cubin)) if cuobjdump_path() else {}
    ok = True
    for name in kernels:
        r = res.get(name, {})
        ops = opcodes(per_kernel.get(name, ""))
        mma = sum(v for k, v in ops.items() if mma_kind(k))
        local = local_memory_ops(per_kernel.get(name, ""))
        bad = r.get("spill_stores", 1) or r.get("spill_loads", 1) or local or (name in gemms and per_kernel and not mma)
        ok &= not bad
        print(f"{arch} {name:32s} regs={r.get('registers')} smem={r.get('smem')} stack={r.get('stack')} "
              f"spills={r.get('spill_stores')}/{r.get('spill_loads')} MMA={mma} local={local or 0}"
              f"{'  <-- FAIL' if bad else ''}")
    return ok


def main(argv=None) -> int:
    import tempfile

    archs = (argv if argv is not None else sys.argv[1:]) or list(ARCHS)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            ok &= _report(arch, compile_cubin(arch, tmp), KERNELS, GEMM_KERNELS, lambda op: op.startswith("IMMA"))
            if arch in FP8_ARCHS:  # ZeroQuant-FP kernels: sm_89+ (QMMA on sm_89, HMMA on sm_90)
                ok &= _report(arch, compile_cubin(arch, tmp, source=FP8_SOURCE), FP8_KERNELS, FP8_GEMM_KERNELS,
                              lambda op: "MMA" in op)
            s4 = QUIK_GEMM_KERNELS if arch in INT4_MMA_ARCHS else tuple(k for k in QUIK_GEMM_KERNELS if k not in QUIK_S4_KERNELS)
            ok &= _report(arch, compile_cubin(arch, tmp, source=QUIK_SOURCE), QUIK_KERNELS, s4,
                          lambda op: op.startswith("IMMA"))
            ok &= _report(arch, compile_cubin(arch, tmp, source=ILLM_SOURCE), ILLM_KERNELS, ILLM_GEMM_KERNELS,
                          lambda op: op.startswith("IMMA"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
