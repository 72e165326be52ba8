"""Offline build checks of qconvert's CUDA kernels: nvcc / NVRTC compile, SASS, ptxas resources.

None of this needs a GPU.  tests/test_kernels_compile.py uses it in CI, and it doubles as a
check script on a GPU machine::

    python -m qconvert_kernels.report sm_80 sm_89 sm_90      # every family's cubins, built as the
                                                              # launchers build them: ptxas resources,
                                                              # MMA / FTZ / local-memory summary

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
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ARCHS = ("sm_80", "sm_89", "sm_90")
NVCC_FLAGS = ("-O3", "-std=c++17", "-Xptxas", "-v")


def discover() -> list:
    """Every ``KernelSource`` declared by a family folder of qconvert_kernels (its ``__init__.py``
    ``SOURCES``), in folder order.  A new family is covered by the build checks once it declares
    its sources there."""
    import importlib
    import pkgutil

    import qconvert_kernels

    found = []
    for info in sorted(pkgutil.iter_modules(qconvert_kernels.__path__), key=lambda i: i.name):
        if info.ispkg:
            found += list(getattr(importlib.import_module(f"qconvert_kernels.{info.name}"), "SOURCES", ()))
    return found


def family_source(family: str, filename: str):
    """The ``KernelSource`` of ``family/filename``."""
    for src in discover():
        if src.family == family and src.path.name == filename:
            return src
    raise KeyError(f"{family}/{filename}: no such kernel source (known: {[s.name for s in discover()]})")


# Names kept for the per-family tests (derived from the family declarations, not listed twice).
from qconvert_kernels.w4a8 import NATIVE as _W4A8  # noqa: E402
from qconvert_kernels.fp8 import FP8 as _FP8  # noqa: E402
from qconvert_kernels.quik import QUIK as _QUIK, S4_GEMMS as QUIK_S4_KERNELS, INT4_MMA_ARCHS  # noqa: E402
from qconvert_kernels.illm import ILLM as _ILLM  # noqa: E402

SOURCE, KERNELS, GEMM_KERNELS = _W4A8.path, _W4A8.kernels, _W4A8.gemms
QUANT_KERNELS = tuple(k for k in KERNELS if k not in GEMM_KERNELS)
FP8_SOURCE, FP8_ARCHS, FP8_KERNELS, FP8_GEMM_KERNELS = _FP8.path, _FP8.archs, _FP8.kernels, _FP8.gemms
FP8_QUANT_KERNELS = tuple(k for k in FP8_KERNELS if k not in FP8_GEMM_KERNELS)
QUIK_SOURCE, QUIK_KERNELS, QUIK_GEMM_KERNELS = _QUIK.path, _QUIK.kernels, _QUIK.gemms
ILLM_SOURCE, ILLM_KERNELS, ILLM_GEMM_KERNELS = _ILLM.path, _ILLM.kernels, _ILLM.gemms
_INCLUDE = re.compile(r'^#include "([\w./]+)"\s*$', re.M)


def kernel_source(source: Path = SOURCE) -> str:
    """The text of a kernel source with its ``#include "x"`` lines (files beside it or above it,
    e.g. ``../common.cuh``) inlined recursively, each file once, for NVRTC, which gets no include
    path (nvcc resolves them itself; the headers' include guards make both agree)."""
    seen: set[Path] = set()

    def expand(path: Path) -> str:
        path = path.resolve()
        if path in seen:
            return f"// (already inlined: {path.name})\n"
        seen.add(path)
        return _INCLUDE.sub(lambda m: expand(path.parent / m.group(1)), path.read_text())

    return expand(Path(source))


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


_BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?BRA(?:\.[A-Z]+)*\s+(?:!?U?P[T0-9]+,\s*)?0x([0-9a-f]+)")
_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/")


def loops(kernel_text: str) -> list[tuple[int, int, collections.Counter]]:
    """Every loop of one kernel's SASS, found by its backward branch: (first address, the branch's
    address, the opcodes between them, both included).  Static counts: an instruction inside the
    body that a branch skips on some iterations is counted all the same."""
    lines = [(int(m.group(1), 16), line) for line in kernel_text.splitlines() if (m := _ADDRESS.search(line)) and _OPCODE.search(line)]
    out = []
    for at, line in lines:
        b = _BRANCH.search(line)
        if b and int(b.group(2), 16) <= at:
            start = int(b.group(2), 16)
            out.append((start, at, collections.Counter(_OPCODE.search(ln).group(1) for a, ln in lines if start <= a <= at)))
    return out


def mma_loop(kernel_text: str, mma_prefix: str) -> tuple[int, int, collections.Counter]:
    """The loop with the most tensor-core instructions (mnemonics starting with ``mma_prefix``): a
    GEMM's main loop."""
    return max(loops(kernel_text), key=lambda lp: sum(c for op, c in lp[2].items() if op.startswith(mma_prefix)))


_SASS_LINE = re.compile(_OPCODE.pattern + r"\s+([^;]*);")  # the mnemonic, then its operands
_UR = re.compile(r"^UR(\d+)$")
_PRED = re.compile(r"^!?U?P(?:T|\d+)$")
_UR_MEMORY = re.compile(r"desc\[UR(\d+)\]|\[([^\]]*)\]")
_UR_IN_ADDRESS = re.compile(r"\bUR(\d+)(\.64)?\b")


def _ur_written(op: str, operands: list[str]) -> set[int]:
    """The uniform registers an instruction writes: its first operand if that is URn (URn and URn+1
    for a 64-bit result: ``.64``, ``.WIDE``), or, after predicate results (``ELECT P0, UR4, PT``),
    the first URn that follows them."""
    for i, o in enumerate(operands):
        m = _UR.match(o)
        if m:
            n = int(m.group(1))
            return {n, n + 1} if (".64" in op or ".WIDE" in op) else {n}
        if not (_PRED.match(o) and i < len(operands) - 1):
            return set()
    return set()


def unwritten_uniform_registers(kernel_text: str) -> list[str]:
    """The instructions of one kernel's SASS that address memory through a uniform register (a
    memory descriptor ``desc[URn]``, which spans URn and URn+1; ``[URn.64]``; ``[R+URn]``) that no
    instruction of the kernel writes.  An H200 raised CUDA_ERROR_ILLEGAL_INSTRUCTION at exactly such
    an LDGSTS (``desc[UR1]``, from ptxas's lowering of a ``createpolicy`` cache hint): the list must
    be empty.  Any write anywhere in the kernel counts, whatever its order or predicate, so the
    check errs towards passing."""
    written: set[int] = set()
    reads = []
    for line in kernel_text.splitlines():
        m = _SASS_LINE.search(line)
        if not m:
            continue
        op, operands = m.group(1), m.group(2).strip()
        written |= _ur_written(op, [o.strip() for o in operands.split(",")])
        regs: set[int] = set()
        for desc, address in _UR_MEMORY.findall(operands):
            if desc:
                regs |= {int(desc), int(desc) + 1}
            for n, wide in _UR_IN_ADDRESS.findall(address):
                regs |= {int(n), int(n) + 1} if wide else {int(n)}
        if regs:
            reads.append((regs, f"{op} {operands}"))
    return [text for regs, text in reads if not regs <= written]


# FLO (find leading one) and DEPBAR (a scoreboard wait, e.g. before a trap) begin like float-unit
# mnemonics but are not
_NOT_FLOAT = re.compile(r"^(FLO\.U(32|64)(\.SH)?|DEPBAR(\.\w+)*)$")


# ptxas now and then writes a constant to a register with a half-precision FMA of zeros on the MMA
# pipe (``HFMA2.MMA R40, -RZ, RZ, 0, 0``; ``..., 0, 4.76837158203125e-07``: -0 * 0 + the immediate's
# two halves, here the integer 8): a move of an immediate with no register operand, not float
# arithmetic on the kernel's data.
_ZEROING_MOVE = re.compile(r"\bHFMA2\.MMA R\d+, -RZ, RZ, [-+0-9.eINFAQ]+, [-+0-9.eINFAQ]+ ;")  # immediates (+INF, QNAN too)


def float_unit_ops(ops, kernel_text: str | None = None) -> list[str]:
    """The float-unit instructions (F*, H*, D*, MUFU, I2F) among a kernel's mnemonics ``ops``: none in
    an integer-only kernel.  With the kernel's SASS text, ``HFMA2.MMA`` counts only beyond its
    moves of immediates (``_ZEROING_MOVE``)."""
    ops = collections.Counter(ops)
    if kernel_text is not None:
        ops["HFMA2.MMA"] -= len(_ZEROING_MOVE.findall(kernel_text))
    return [op for op, n in ops.items() if n > 0 and op.startswith(("F", "H", "D", "MUFU", "I2F")) and not _NOT_FLOAT.match(op)]


# ----------------------------------------------------------------------------- NVRTC


@functools.lru_cache(maxsize=None)
def _load_nvrtc():
    """libnvrtc through ctypes: the loader's path, the CUDA toolkit (CUDA_HOME, /usr/local/cuda*),
    then the NVIDIA pip wheels (nvidia/cu*/lib, nvidia/cuda_nvrtc/lib); None if none loads."""
    names = [ctypes.util.find_library("nvrtc")]
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "lib64")
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(Path(nvcc).resolve().parent.parent / "lib64")
    dirs += sorted(Path("/usr/local").glob("cuda*/lib64"), reverse=True)
    dirs += _pip_cuda_dirs("lib")
    for entry in sys.path:
        dirs.append(Path(entry or ".") / "nvidia" / "cuda_nvrtc" / "lib")
    for d in dirs:
        if d.is_dir():
            names += sorted((str(p) for p in d.glob("libnvrtc.so*") if "builtins" not in p.name), reverse=True)
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
    """Compile a source file with NVRTC (its includes inlined by ``kernel_source``, no include
    path).  Returns (cubin bytes, NVRTC log); raises CompileError with the log.  The kernels'
    launchers build with ``qconvert_kernels.launch.build`` (this function with BUILD_OPTIONS)."""
    return nvrtc_compile_text(arch, kernel_source(source), Path(source).name, options)


def nvrtc_compile_text(arch: str, text: str, name: str, options=("-std=c++17",)) -> tuple[bytes, str]:
    """NVRTC of a source text: a cubin for ``sm_XY``, PTX (bytes) for ``compute_XY``."""
    lib = _load_nvrtc()
    if lib is None:
        raise CompileError("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    if not re.fullmatch(r"(sm|compute)_\d{2,3}[a-z]?", arch):
        raise ValueError(f"arch must look like 'sm_90' or 'compute_90', got {arch!r}")
    prog = ctypes.c_void_p()

    def check(res, what):
        if res != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise CompileError(f"{what} ({name}, {arch}): {lib.nvrtcGetErrorString(res).decode()}\n{log()}")

    def log() -> str:
        size = ctypes.c_size_t()
        if lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) != 0:
            return ""
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode(errors="replace")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), name.encode(), 0, None, None), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}", *options]
        arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        check(lib.nvrtcCompileProgram(prog, len(opts), arr), "nvrtcCompileProgram")
        size = ctypes.c_size_t()
        cubin = arch.startswith("sm_")
        check((lib.nvrtcGetCUBINSize if cubin else lib.nvrtcGetPTXSize)(prog, ctypes.byref(size)), "nvrtcGet*Size")
        buf = ctypes.create_string_buffer(size.value)
        check((lib.nvrtcGetCUBIN if cubin else lib.nvrtcGetPTX)(prog, buf), "nvrtcGetCUBIN/PTX")
        return (buf.raw if cubin else buf.value), log()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ----------------------------------------------------------------------------- CLI
