"""Where the calibrated walk runs (``quantize --device``) and where its large tensors live.

The walk (qconvert/block_walk.py) runs on one device.  On ``cuda`` each decoder block is read
from the source to the GPU when its turn comes and dropped when written; the model skeleton
stays on the meta device.  Its large tensors are placed in this order of preference, by
``place`` (a pure function, so that the order is tested without a GPU):

1. the GPU, while they fit ``--max-gpu-memory`` (default: ``GPU_FRACTION`` of the GPU memory
   free when the run starts, and never more than what one block's working set leaves free);
2. pinned CPU memory (fast copies to and from the GPU), while they fit ``--max-memory``
   (default: half the available RAM);
3. the files of ``OUT.partial/calib/`` mapped into memory (the two activation buffers), or,
   for the MLP cache, nothing (stage E recomputes the gate/up product instead).

On ``cpu`` step 1 is skipped and step 2 is plain RAM: exactly the placement of the CPU-only
walk before the device option existed, so a CPU run writes the same bytes.

Everything written to OUT is moved to the CPU first, in the dtypes of a CPU run.
"""

from __future__ import annotations

import contextlib
import os
import re
import traceback
from dataclasses import dataclass

import torch

from qconvert.errors import QConvertError

GPU_FRACTION = 0.5  # of the free GPU memory at the start: the default --max-gpu-memory
CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to pick deterministic GEMM workspaces
DEVICES = ("cuda", "cpu")

OutOfMemoryError = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


@dataclass(frozen=True)
class WalkDevice:
    """The device the walk runs on, and the first line ``quantize`` prints about it."""

    device: torch.device
    line: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def cuda_unusable_reason() -> str | None:
    """Why CUDA cannot be used here (None when it can)."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    try:
        count = torch.cuda.device_count()
        if count == 0 or not torch.cuda.is_available():
            return "torch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)"
    except RuntimeError as e:  # a driver too old for this build, and the like
        return f"CUDA does not initialise ({str(e).splitlines()[0]})"
    return None


def resolve_device(requested: str | torch.device | None) -> WalkDevice:
    """``None``/"auto": cuda when usable, else cpu; "cpu"; "cuda" or "cuda:N" (an error, naming
    why, when no GPU is usable)."""
    if isinstance(requested, torch.device):
        requested = str(requested)
    if requested in (None, "auto"):
        reason = cuda_unusable_reason()
        if reason is not None:
            return WalkDevice(torch.device("cpu"), f"quantizing on cpu (no usable GPU: {reason})")
        requested = "cuda"
    if requested == "cpu":
        return WalkDevice(torch.device("cpu"), "quantizing on cpu")
    if not re.fullmatch(r"cuda(:\d+)?", str(requested)):
        raise QConvertError(f"--device {requested}: unknown; choose {' or '.join(DEVICES)} (one GPU: cuda or cuda:N)")
    reason = cuda_unusable_reason()
    if reason is not None:
        raise QConvertError(f"--device {requested}: no usable GPU ({reason}); install a CUDA build of torch on a "
                            "machine with an NVIDIA GPU, or drop --device (or pass --device cpu) to quantize on the CPU")
    prepare_cuda_environment()
    dev = torch.device(requested)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise QConvertError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"choose cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return WalkDevice(dev, f"quantizing on {dev} ({torch.cuda.get_device_name(dev)})")


# ---- placement ------------------------------------------------------------------------------


def float_path(device: torch.device) -> str:
    """The kernels a calibrated run's float arithmetic goes through on ``device``.

    GPTQ's rounding decisions follow the last bits of that arithmetic, so the same command writes
    other tensors on another float path (docs/accuracy.md, "The same code on an AVX-512 CPU"):
    the report names it.  On a CPU: ATen's instruction set (``ATEN_CPU_CAPABILITY`` caps it), MKL's
    cap where ``MKL_ENABLE_INSTRUCTIONS`` sets one, and the thread count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"cuda {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
    return (f"cpu {torch.backends.cpu.get_cpu_capability()} kernels{f' (MKL {mkl})' if mkl else ''}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def place(need: int, gpu_left: int, ram_left: int, cuda: bool, spill: str = "disk") -> tuple[str, int, int]:
    """Where a tensor of ``need`` bytes goes, and the budgets left after it.

    Returns (place, gpu_left, ram_left) with place "gpu" (cuda only, while ``need`` fits
    ``gpu_left``), else "pinned" (cuda) or "ram" (cpu) while it fits ``ram_left``, else
    ``spill`` ("disk": files mapped into memory; "none": not kept at all).
    """
    if cuda and need <= gpu_left:
        return "gpu", gpu_left - need, ram_left
    if need <= ram_left:
        return ("pinned" if cuda else "ram"), gpu_left, ram_left - need
    return spill, gpu_left, ram_left


def available_ram() -> int:
    """Bytes of RAM available for new work: the kernel's estimate ``MemAvailable`` (free memory
    plus the page cache it can drop), else sysconf's free pages, else 8 GB where neither tells."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def block_working_set(config, batch_tokens: int) -> int:
    """Bytes of GPU memory one decoder block's calibration needs besides the activations it
    keeps (an estimate, on the safe side): the block's weights in float32, the Hessian of the
    widest input with the copies GPTQ makes of it (dampened, permuted, Cholesky factor, its
    inverse and the inverse's factor), the widest layer's weight and GPTQ buffers, and the
    temporaries of one batch of ``batch_tokens`` tokens."""
    hidden = config.hidden_size
    inter = max(getattr(config, "intermediate_size", 0) or 0, getattr(config, "moe_intermediate_size", 0) or 0, hidden)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    experts = max(getattr(config, "num_local_experts", 0) or 0, getattr(config, "num_experts", 0) or 0, 1)
    attn = hidden * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * hidden * inter * experts
    widest = max(hidden, inter)
    return 4 * (attn + mlp + 6 * widest * widest + 8 * hidden * inter + 8 * batch_tokens * widest)


def gpu_budget(device: torch.device, max_gpu_memory: int | None, working_set: int) -> int:
    """Bytes of GPU memory the activations may take: ``max_gpu_memory`` if given, else
    ``GPU_FRACTION`` of the free memory; never more than the free memory less one block's
    ``working_set``.  Raises, naming the figures and the fix, when even the block does not fit."""
    free, _total = torch.cuda.mem_get_info(device)
    if working_set > free:
        raise QConvertError(f"quantizing on {device} needs about {_gb(working_set)} of GPU memory for one decoder block "
                            f"(float32 weights, Hessians, GPTQ buffers, one batch) and {_gb(free)} is free: free GPU "
                            "memory (close other processes on it) or quantize on the CPU with --device cpu")
    if max_gpu_memory is not None and max_gpu_memory > free:
        raise QConvertError(f"--max-gpu-memory {_gb(max_gpu_memory)} is more than the {_gb(free)} free on {device}; "
                            f"lower it (e.g. --max-gpu-memory {int(free * GPU_FRACTION) // 10**9}GB)")
    wanted = int(free * GPU_FRACTION) if max_gpu_memory is None else max_gpu_memory
    return max(0, min(wanted, free - working_set))


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


# ---- determinism and errors -----------------------------------------------------------------


@contextlib.contextmanager
def deterministic(device: torch.device):
    """On CUDA: deterministic algorithms (warn-only), cuDNN without benchmarking, full-precision
    float32 matmuls (no TF32); the previous settings come back afterwards.  On CPU: nothing
    (CPU kernels are deterministic for a fixed thread count)."""
    if device.type != "cuda":
        yield
        return
    from torch.utils import deterministic as det

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    det.fill_uninitialized_memory = False  # every buffer the walk allocates is written before it is read
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32, det.fill_uninitialized_memory) = saved[2:]


@contextlib.contextmanager
def graph_friendly():
    """Deterministic-algorithm checks off for a while: the decode engine's CUDA graph writes its KV
    cache with ``index_copy_`` (one column, no duplicate index: reproducible as it is), whose
    deterministic variant is a sort-based ``index_put_`` that graph capture need not accept."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def prepare_cuda_environment() -> None:
    """cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it creates its first handle: set it (unless the
    user did) before any CUDA work, so that GEMMs are reproducible run to run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def out_of_memory_message(err: BaseException, device: torch.device, partial, stages_done: int,
                          max_gpu_memory: int | None) -> str:
    """The one-line message for a CUDA out-of-memory error in the middle of a run."""
    asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]i?B)", str(err))
    need = f"it needed {asked.group(1)} more" if asked else "an allocation failed"
    in_use = ""
    if device.type == "cuda":
        try:
            in_use = f"; {_gb(torch.cuda.max_memory_allocated(device))} at the peak of this run"
        except RuntimeError:  # the figure is a courtesy; the message must come out regardless
            pass
    kept = (f"{partial} keeps the {stages_done} finished stage(s)" if stages_done else f"{partial} keeps the run's settings")
    limit = f"now {_gb(max_gpu_memory)}" if max_gpu_memory is not None else f"default {GPU_FRACTION:.0%} of the free memory"
    return (f"{device} ran out of memory ({need}{in_use}); {kept}: repeat the command with --resume and a lower "
            f"--max-gpu-memory ({limit}; activations beyond it go to CPU memory), or with --device cpu")


def release(err: BaseException) -> None:
    """Drop the frames of a failed run (they hold its GPU tensors) and return the memory to the driver."""
    traceback.clear_frames(err.__traceback__)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors written to OUT, on the CPU (a CPU tensor is returned as it is)."""
    return {k: v.cpu() for k, v in tensors.items()}
