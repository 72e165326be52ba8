"""What every kernel family's launcher shares: building the modules, loading them per device,
launching on torch's stream, argument checks, and the per-token quantizer launch.

Building (``build``).  Every module is compiled here, by NVRTC, into a cubin for the device's
architecture, with ``BUILD_OPTIONS`` (no flush-to-zero, IEEE division and square root, no FMA
contraction), cached on disk, and loaded with ``cupy.RawModule(path=...)``.  Why not
``cupy.RawModule(code=..., options=...)``: CuPy appends ``-ftz=true`` to the caller's options
(NVRTC takes the last), so float operations would flush subnormal values to zero and the kernels
would no longer equal their torch references (a row whose amax is above 2^126 would quantize to
zeros).  tests/test_kernels_families.py builds the same cubins with this same function and
fails on any ``.FTZ`` instruction in their SASS.

NVRTC backends, in order: ``libnvrtc`` through ctypes (``compile.nvrtc_compile``: the CUDA
toolkit's, or the ``nvidia-cuda-nvrtc`` wheel's), then the one CuPy itself loads
(``cupy_backends.cuda.libs.nvrtc``), then ``nvcc -cubin``; all get the same options.  A device
newer than the NVRTC gets PTX for the newest architecture NVRTC knows (the driver compiles it;
PTX written without ``.ftz`` stays without).

Launching (``launch``): on torch's current stream (``cupy_stream``: ``cupy.cuda.Stream.from_external``
where CuPy has it, else ``cupy.cuda.ExternalStream``; one object per stream), so the kernels
order with torch's own work and can be captured in a CUDA graph; dynamic shared memory above
48 KB is opted into once per function.  No launcher reads a device value on the host.

Tests emulate launches on the CPU (``qconvert_kernels/w4a8/emulate.py``): ``set_launch_hook``
replaces the CuPy launch and lets CPU tensors through ``check_cuda``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import subprocess
import weakref
from pathlib import Path

import torch

from qconvert_kernels import compile as kc

BUILD_OPTIONS = ("-std=c++17", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--fmad=false", "-Xptxas=-v")
MAX_STATIC_SMEM = 48 * 1024
_OUT = {torch.float16: "f16", torch.bfloat16: "bf16"}

# test hook: a callable(name, grid, block, args, shared_mem, source) replacing the CuPy launch
_HOOK = None
_HOOK_SMS = 8
_REGISTRY: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # address -> live tensor (hooks only)


# ----------------------------------------------------------------------------- building


def cache_dir() -> Path:
    d = os.environ.get("QCONVERT_KERNEL_CACHE")
    return Path(d) if d else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qconvert" / "kernels"


@functools.lru_cache(maxsize=None)
def _nvrtc_archs() -> tuple[int, ...]:
    """The architectures (e.g. 80, 90) the ctypes-loaded NVRTC can target; () if unknown."""
    import ctypes

    lib = kc._load_nvrtc()
    if lib is None or not hasattr(lib, "nvrtcGetNumSupportedArchs"):
        return ()
    n = ctypes.c_int()
    if lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)) != 0:
        return ()
    arr = (ctypes.c_int * n.value)()
    if lib.nvrtcGetSupportedArchs(arr) != 0:
        return ()
    return tuple(arr)


def _cupy_nvrtc_compile(arch: str, text: str, name: str, options) -> tuple[bytes, str]:
    from cupy_backends.cuda.libs import nvrtc  # the NVRTC CuPy loads

    prog = nvrtc.createProgram(text, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", *options])
        except Exception as e:  # noqa: BLE001 - re-raised with the log
            raise kc.CompileError(f"NVRTC (cupy) failed for {name} ({arch}): {e}\n{nvrtc.getProgramLog(prog)}") from None
        log = nvrtc.getProgramLog(prog)
        return (nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog).encode()), log
    finally:
        nvrtc.destroyProgram(prog)


def _nvcc_compile(arch: str, text: str, name: str, options) -> tuple[bytes, str]:
    import tempfile

    nvcc = kc.nvcc_path()
    if nvcc is None:
        raise kc.CompileError("no NVRTC and no nvcc: cannot build the kernels")
    flags = [o for o in options if o != "-Xptxas=-v"] + ["-Xptxas", "-v"]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / name, Path(tmp) / "out.bin"
        src.write_text(text)
        kind = "-cubin" if arch.startswith("sm_") else "-ptx"
        proc = subprocess.run([nvcc, kind, f"-arch={arch}", "-O3", *flags, "-o", str(out), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise kc.CompileError(f"nvcc failed for {name} ({arch}):\n{proc.stdout}{proc.stderr}")
        return out.read_bytes(), proc.stdout + proc.stderr


def _compile(arch: str, text: str, name: str, options) -> tuple[bytes, str, str]:
    """(binary, log, backend) from the first NVRTC backend that is there."""
    if kc.nvrtc_available():
        binary, log = kc.nvrtc_compile_text(arch, text, name, options)
        return binary, log, "nvrtc-ctypes"
    try:
        import cupy_backends.cuda.libs.nvrtc  # noqa: F401
    except Exception:  # noqa: BLE001
        binary, log = _nvcc_compile(arch, text, name, options)
        return binary, log, "nvcc"
    binary, log = _cupy_nvrtc_compile(arch, text, name, options)
    return binary, log, "nvrtc-cupy"


def build(source, arch: str, options=BUILD_OPTIONS) -> Path:
    """The cubin (``sm_XY``) or PTX (``compute_XY``) of a kernel source, built with ``options``
    and cached under ``cache_dir()`` by the hash of the inlined text, options and target.
    The build log (ptxas -v report) is kept beside it as ``.log``, and ``.json`` says which
    backend made it.  Raises CompileError with the compiler's log."""
    source = Path(source)
    if not re.fullmatch(r"(sm|compute)_\d{2,3}[a-z]?", arch):
        raise ValueError(f"arch must look like 'sm_90' or 'compute_90', got {arch!r}")
    text = kc.kernel_source(source)
    key = hashlib.sha256("\0".join([text, arch, *options]).encode()).hexdigest()[:24]
    out = cache_dir() / f"{source.stem}.{arch}.{key}.{'cubin' if arch.startswith('sm_') else 'ptx'}"
    if out.is_file():
        return out
    binary, log, backend = _compile(arch, text, source.name, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(binary)
    out.with_suffix(".log").write_text(log)
    out.with_suffix(".json").write_text(json.dumps({"source": str(source), "arch": arch, "options": list(options), "backend": backend}))
    tmp.replace(out)
    return out


def build_log(path) -> str:
    """The compiler log written by ``build`` beside the binary (ptxas -v report)."""
    return Path(path).with_suffix(".log").read_text()


def target_for(capability: int) -> str:
    """The build target for a device of compute capability ``capability`` (e.g. 90): its own
    ``sm_`` if NVRTC supports it (or nothing is known), else PTX of the newest supported arch."""
    archs = _nvrtc_archs()
    if not archs or capability in archs:
        return f"sm_{capability}"
    older = [a for a in archs if a <= capability]
    return f"compute_{max(older)}" if older else f"sm_{capability}"


# ----------------------------------------------------------------------------- devices, modules


def _cupy():
    import cupy  # lazy: optional dependency

    return cupy


def capability(index: int = 0) -> int | None:
    try:
        return int(_cupy().cuda.Device(index).compute_capability)
    except Exception:  # noqa: BLE001
        return None


def available(min_capability: int = 80) -> bool:
    """True if cupy imports, torch sees CUDA and device 0 has compute capability >= the given one;
    never raises."""
    try:
        cp = _cupy()
        if cp.cuda.runtime.getDeviceCount() < 1 or not torch.cuda.is_available():
            return False
        cap = capability(0)
        return cap is not None and cap >= min_capability
    except Exception:  # noqa: BLE001
        return False


@functools.lru_cache(maxsize=None)
def module(source, device_index: int = 0):
    """The ``cupy.RawModule`` of ``source`` built for device ``device_index`` (one per device)."""
    cp = _cupy()
    with cp.cuda.Device(device_index):
        cap = capability(device_index)
        return cp.RawModule(path=str(build(Path(source), target_for(cap))))


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int = 0) -> int:
    """Multiprocessors of the device (host-side property, no device work)."""
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


@functools.lru_cache(maxsize=None)
def smem_per_sm(device_index: int = 0) -> int | None:
    """Shared memory of one multiprocessor in bytes (host-side property), None where torch does not say."""
    value = getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_multiprocessor", None)
    return int(value) if value else None


_SMEM_OPTED: dict = {}  # (source, kernel, device) -> the dynamic shared memory opted in for


def _opt_in_smem(fn, key, nbytes: int) -> None:
    if nbytes <= MAX_STATIC_SMEM or _SMEM_OPTED.get(key, 0) >= nbytes:
        return
    try:
        fn.max_dynamic_shared_size_bytes = nbytes
    except Exception:  # noqa: BLE001 - older CuPy: the driver call
        drv = _cupy().cuda.driver
        drv.funcSetAttribute(fn.ptr, drv.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
    _SMEM_OPTED[key] = nbytes


def launch(source, name: str, grid: tuple, block: tuple, args: tuple, device: torch.device, shared_mem: int = 0) -> None:
    """Launch kernel ``name`` of ``source``'s module on torch's current stream of ``device``."""
    if _HOOK is not None:
        _HOOK(name, grid, block, args, shared_mem, Path(source))
        return
    cp = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cp.cuda.Device(index):
        fn = module(Path(source), index).get_function(name)
        _opt_in_smem(fn, (str(source), name, index), shared_mem)
        with cupy_stream(cp, torch.cuda.current_stream(device).cuda_stream, index):
            fn(grid, block, args, shared_mem=shared_mem)


class _TorchStream:
    """A torch stream's handle as the CUDA stream protocol hands it over (``__cuda_stream__``:
    protocol version 0 and the ``cudaStream_t``)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


_STREAMS: dict = {}  # (device index, cudaStream_t) -> CuPy's stream object on it
_MAX_STREAMS = 1024  # torch's stream pools are bounded; streams a user makes one by one are not


def cupy_stream(cp, ptr: int, index: int):
    """CuPy's stream object on torch's stream ``ptr`` of device ``index``, made once per stream
    rather than once per launch: ``cupy.cuda.Stream.from_external`` (CuPy 14+, the CUDA stream
    protocol), or ``cupy.cuda.ExternalStream`` where CuPy has no such method (CuPy 14 deprecates
    it, which would warn at every launch).  Neither owns the stream: torch does."""
    key = (index, ptr)
    stream = _STREAMS.get(key)
    if stream is None:
        from_external = getattr(cp.cuda.Stream, "from_external", None)
        try:
            stream = from_external(_TorchStream(ptr)) if from_external is not None else None
        except Exception:  # noqa: BLE001 - a CuPy whose protocol check differs: the older wrapper
            stream = None
        if stream is None:
            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "ExternalStream is deprecated", DeprecationWarning)
                stream = cp.cuda.ExternalStream(ptr)
        if len(_STREAMS) >= _MAX_STREAMS:
            _STREAMS.clear()
        _STREAMS[key] = stream
    return stream


@contextlib.contextmanager
def launch_hook(hook, sm_count: int = 8):
    """Route every ``launch`` to ``hook(name, grid, block, args, shared_mem, source)``, let CPU
    tensors through ``check_cuda`` and plan for ``sm_count`` SMs (CPU emulation, launcher tests)."""
    global _HOOK, _HOOK_SMS
    old, _HOOK = _HOOK, hook
    old_sms, _HOOK_SMS = _HOOK_SMS, sm_count
    try:
        yield
    finally:
        _HOOK, _HOOK_SMS = old, old_sms
        _REGISTRY.clear()


def current_hook():
    """The launch hook installed now (None outside ``launch_hook``): an emulator of one family
    hands another family's launches to it."""
    return _HOOK


def emulated_sm_count() -> int:
    """The SM count a launch hook plans for (CPU tensors under ``launch_hook``)."""
    if _HOOK is None:
        raise ValueError("CPU tensors reach the kernels only under launch_hook (emulation)")
    return _HOOK_SMS


class ChainedEmulator:
    """The launch hook of one family's emulator that hands every other launch to the hook installed
    before it (``inner``), so family emulators stack: a model's W4A8, norm and rope launches each on
    their own.  A subclass names its ``FAMILY``, ``KERNELS`` and ``MUTATIONS`` (deliberate kernel
    bugs it can play) and defines ``emulate(name, grid, block, args, shared_mem)``, which checks the
    launch, runs it and returns what ``launches`` records of it."""

    FAMILY = ""
    KERNELS: tuple = ()
    MUTATIONS: frozenset = frozenset()

    def __init__(self, inner=None, mutations=frozenset()):
        unknown = set(mutations) - self.MUTATIONS
        if unknown:
            raise ValueError(f"unknown mutations {sorted(unknown)}")
        self.inner, self.mutations = inner, frozenset(mutations)
        self.launches: list[tuple] = []

    def __call__(self, name, grid, block, args, shared_mem, source):
        if name not in self.KERNELS:
            if self.inner is None:
                raise NotImplementedError(f"{self.FAMILY} emulator: no kernel {name}")
            return self.inner(name, grid, block, args, shared_mem, source)
        self.launches.append(self.emulate(name, tuple(grid), tuple(block), args, shared_mem))

    def emulate(self, name: str, grid: tuple, block: tuple, args: tuple, shared_mem: int) -> tuple:
        raise NotImplementedError

    def check_grid(self, name: str, grid: tuple, dims: int = 3, max_yz: int = 65535) -> None:
        """The launch's grid has ``dims`` dimensions within CUDA's limits (x < 2^31, y and z <= 65535)."""
        if len(grid) != dims or max(grid[1:], default=0) > max_yz or grid[0] >= 2**31:
            raise AssertionError(f"{name}: grid {grid} beyond CUDA's limits (x < 2^31, y and z <= {max_yz})")

    def check_arg_types(self, name: str, args: tuple, params: tuple, types: tuple) -> None:
        """The launch's arguments must have the numpy ``types`` of the kernel's ``params``, in order
        (CuPy packs an argument by its type: an int32 where the kernel reads a long long would shift
        every later argument)."""
        got = tuple(type(a) for a in args)
        if got != tuple(types):
            raise AssertionError(f"{name}: arguments of types {[t.__name__ for t in got]}, the kernel takes "
                                 f"{[t.__name__ for t in types]} ({', '.join(params)})")

    @classmethod
    @contextlib.contextmanager
    def chained(cls, mutations=frozenset()):
        """Run the family's launches on a new emulator (others on the hook already installed, if
        any); yields the emulator (its ``launches``)."""
        emu = cls(current_hook(), mutations)
        with launch_hook(emu, sm_count=emulated_sm_count() if emu.inner is not None else 8):
            yield emu


# ----------------------------------------------------------------------------- arguments


def ptr(t: torch.Tensor | None):
    """A tensor's device address as the kernel argument (0 for None)."""
    import numpy as np

    if t is None:
        return np.uint64(0)
    if _HOOK is not None:
        _REGISTRY[t.data_ptr()] = t
    return np.uint64(t.data_ptr())


def tensor_at(address: int) -> torch.Tensor:
    """The tensor passed with ``ptr`` at this address (launch hooks only).  The registry holds weak
    references: a temporary that was freed before the launch (its memory could be reused by then)
    is reported as such."""
    try:
        return _REGISTRY[int(address)]
    except KeyError:
        raise LookupError(f"kernel argument {int(address):#x}: no live tensor there (a temporary freed before the launch?)") from None


class ViewMemory:
    """A launch argument's tensor as an emulated kernel sees it (launch hooks only): its whole
    storage as words of ``itemsize`` bytes (uint16 for 2, int64 for 8; a numpy view, so writes land
    in the tensor), the element its pointer names (``base``) and the offsets, from that element,
    of its view's elements (``view``).  ``at`` refuses an access outside the view: a stride mixed
    up or a spare thread reads or writes in a neighbour's elements."""

    def __init__(self, name: str, address: int, itemsize: int):
        import numpy as np

        t = tensor_at(address)
        if t.element_size() != itemsize:
            raise AssertionError(f"{name}: a {t.dtype} tensor where the kernel reads {8 * itemsize}-bit values")
        as_int, as_np = {2: (torch.int16, np.uint16), 8: (torch.int64, np.int64)}[itemsize]
        words = t.untyped_storage().nbytes() // itemsize
        self.words = t.detach().as_strided((words,), (1,), 0).view(as_int).numpy().view(as_np)
        self.base = t.storage_offset()
        offsets = np.zeros(1, np.int64)
        for size, stride in zip(t.shape, t.stride()):
            offsets = (offsets[:, None] + np.arange(size, dtype=np.int64) * stride).reshape(-1)
        self.name, self.view = name, np.unique(offsets)
        self.count = len(offsets)
        self.storage = t.untyped_storage().data_ptr()

    def at(self, offsets):
        """Storage indices of these view offsets (an AssertionError if any falls outside the view)."""
        import numpy as np

        outside = ~np.isin(offsets, self.view)
        if outside.any():
            raise AssertionError(f"{self.name}: {int(outside.sum())} accesses outside its view "
                                 f"(offsets {offsets[outside][:4].tolist()}...)")
        return self.base + offsets

    def write_all(self, kernel: str, at, values, grid: tuple) -> None:
        """Store ``values`` at the storage indices ``at``, which must cover every element of the
        view exactly once (an output a launch writes whole)."""
        import numpy as np

        written = np.zeros(len(self.words), np.int64)
        np.add.at(written, at, 1)
        want = self.base + self.view
        if (written[want] != 1).any() or written.sum() != self.count:
            raise AssertionError(f"{kernel}: {self.name}'s elements written {int(written[want].min())} to "
                                 f"{int(written[want].max())} times (grid {grid})")
        self.words[at] = values

    def overlaps(self, other: "ViewMemory") -> bool:
        import numpy as np

        return self.storage == other.storage and np.intersect1d(self.base + self.view, other.base + other.view).size > 0


def i32(v: int):
    import numpy as np

    v = int(v)
    if not -(2**31) <= v < 2**31:
        raise ValueError(f"kernel argument {v} does not fit int32")
    return np.int32(v)


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_cuda(fn: str, *tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``; ValueError unless they are all on one CUDA device."""
    dev = tensors[0].device
    for t in tensors:
        require((t.is_cuda or _HOOK is not None) and t.device == dev,
                f"{fn}: all tensors must be on one CUDA device (got {[str(x.device) for x in tensors]})")
    return dev


def check_writable(fn: str, **tensors: torch.Tensor) -> None:
    """Outputs a kernel writes element by element must give each element its own memory (no
    expanded or overlapping view, whose elements a launch would write in a race) and must not share
    storage with each other (the kernels' ``__restrict__``): a ValueError that names the tensor.
    The test is the sufficient one: taken by increasing stride, each dimension's stride clears the
    span of the ones below it."""
    for name, t in tensors.items():
        if t.numel() == 0:
            continue  # no element to write
        span = 0  # the largest offset the dimensions below reach, in elements
        for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
            require(stride > span, f"{fn}: {name} {tuple(t.shape)} with strides {tuple(t.stride())} has elements "
                                   "that share memory (an expanded or overlapping view); give a tensor of its own")
            span += (size - 1) * stride
    ptrs = [(name, t.untyped_storage().data_ptr()) for name, t in tensors.items() if t.numel()]
    for i, (a, pa) in enumerate(ptrs):
        for b, pb in ptrs[i + 1:]:
            require(pa != pb, f"{fn}: {a} and {b} share memory; give tensors of their own")


def check_aligned(fn: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        require(t.data_ptr() % 16 == 0, f"{fn}: {name} must be 16-byte aligned (data_ptr {t.data_ptr():#x})")


QUANT_THREADS = 256  # qk::QUANT_THREADS (common.cuh)


def quantize_per_token(source, fn: str, x: torch.Tensor, kp: int, q_dtype: torch.dtype):
    """Checks, output buffers and launch shared by the per-token quantizers (int8 in w4a8, fp8 in
    fp8): kernel ``{fn}_{f16|bf16}`` of ``source`` writes xq [M, kp] (zero-padded) and the float32
    scale t [M]."""
    require(x.dim() == 2, f"{fn}: x must be [M, K], got {tuple(x.shape)}")
    require(x.dtype in _OUT, f"{fn}: x must be float16 or bfloat16, got {x.dtype}")
    m, k = x.shape
    require(kp >= k, f"{fn}: kp={kp} < K={k}")
    dev = check_cuda(fn, x)
    x = x.contiguous()
    xq = torch.empty((m, kp), dtype=q_dtype, device=dev)
    t = torch.empty((m,), dtype=torch.float32, device=dev)
    if m:
        launch(source, f"{fn}_{_OUT[x.dtype]}", (m,), (QUANT_THREADS,), (ptr(x), ptr(xq), ptr(t), i32(m), i32(k), i32(kp)), dev)
    return xq, t
