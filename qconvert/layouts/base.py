"""What a layout is: how one quantized linear is stored, checked, run, exported and described.

A *layout* names the tensors one quantized linear ``P`` (a weight W of shape [N, K]) leaves
in OUT, under ``P.<suffix>``.  Everything qconvert does with such a linear asks its layout:

=================  ============================================================================
``params``          what the stored tensors and the method's recorded config say about this layer
                    (group size, outlier count, LoRC rank): read from headers, never from data
``spec``            suffix -> TensorSpec (dtype, shape) from N, K and those params: the single
                    source of truth, as compressed-tensors' ``compression_param_info`` is
``check``           value-level problems (ranges, padding, the int32 bound) for ``qconvert verify``
``module``          the runtime ``nn.Module`` that computes the layer (CPU reference / CUDA kernels)
``model_runtime``   optional: a whole-model runtime that replaces transformers' (I-LLM's integer model)
``export_scheme``   the compressed-tensors scheme it maps to, or ``NotExportable`` with the reason
``export_tensors``  the exported tensors of one layer
``figures``         what ``qconvert inspect`` shows for a report row (α, headroom, extras)
``card_rows``       what the model card says of weights and activations, and ``tags``
``random_tensors``  random tensors of this layout (synthetic benchmarks), where supported
=================  ============================================================================

A layout family (one file under ``qconvert/layouts/``) subclasses ``Layout`` and registers one
instance per layout name; third parties register theirs under the entry-point group
``qconvert.layouts`` (see ``qconvert.layouts.registry``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from qconvert.errors import QConvertError
from qconvert.layouts.derived import DerivedHolder

ShapeOf = Callable[[str], "tuple[int, ...] | None"]  # suffix -> stored shape (None: absent)


@dataclass(frozen=True)
class TensorSpec:
    """dtype and shape of one stored tensor, and what it holds (docs/format.md)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    doc: str = ""


class NotExportable(QConvertError):
    """This layout (with these parameters) has no faithful compressed-tensors equivalent."""


class QuantizedModule(DerivedHolder):
    """Base of every layout's runtime module: ``layout`` (its name), ``in_features``,
    ``out_features``; ``check_cuda(name)`` raises ``NoKernel`` (a QConvertError) when the CUDA
    kernels cannot run the layer (the model then runs on CPU only)."""

    layout: str
    in_features: int
    out_features: int

    def inside_stored_model(self) -> None:
        """Called when the layer runs inside the model rebuilt from OUT's own tensors (whatever a
        method folded into them, e.g. I-LLM's smoothing, is then already in its inputs)."""

    def prepare_cuda(self, device: torch.device | None = None) -> None:
        """Anything the module's kernels need done once (a repack) for ``device`` (default: where
        its tensors are), outside any captured step; nothing by default."""

    def keep_stored_on_host(self) -> None:
        """Once prepared: hold in host memory, through any later move of the module, the stored
        tensors its kernels no longer read (so a GPU holds the weights once); nothing by default."""

    _held_on_host: tuple = ()  # buffer names ``hold_on_host`` keeps in host memory

    @property
    def _stored_on_host(self) -> bool:
        return bool(self._held_on_host)

    def hold_on_host(self, names) -> None:
        """Move the named stored buffers to host memory and keep them there through later moves of
        the module (``_apply``), where the CPU path still finds them (missing / None ones skipped)."""
        names = tuple(n for n in names if self._buffers.get(n) is not None)
        for name in names:
            self._buffers[name] = self._buffers[name].cpu()
        self._held_on_host = names

    def _apply(self, fn, *args, **kwargs):
        if not self._held_on_host:
            return super()._apply(fn, *args, **kwargs)
        held = {name: self._buffers[name] for name in self._held_on_host}
        for name in held:
            self._buffers[name] = None
        try:
            return super()._apply(fn, *args, **kwargs)
        finally:
            self._buffers.update(held)

    @classmethod
    def fuse(cls, members: list[nn.Module]) -> bool:
        """Make ``members`` (sibling linears that read the same input, e.g. q/k/v) run as one
        GEMM on the GPU, where this layout's kernels can; False (nothing changed) by default."""
        return False

    def check_cuda(self, name: str) -> None:  # pragma: no cover - overridden where kernels exist
        raise QConvertError(f"{name}: layout {self.layout} has no CUDA kernel in this release; load on cpu")

    def _bias(self, bias: torch.Tensor | None) -> None:
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _finish(self, y: torch.Tensor, x: torch.Tensor, shape) -> torch.Tensor:
        """The float result [M, N] cast to the input dtype, plus the bias, reshaped like x."""
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class SiblingGroup:
    """Sibling linears that read the same input (q/k/v, gate/up) run as one GEMM (``QuantizedModule.fuse``).

    Their weights are joined along N at load time and prepared once (a subclass's ``prepare``); the
    first member called with an input runs the joined GEMM (``_run``) and keeps its output, and each
    sibling then called with that same input (the same tensor object, unchanged since: its
    ``_version``, where torch keeps one: not for tensors made under ``torch.inference_mode``, whose
    in-place changes no counter shows; the parents ``fuse_siblings`` joins call their siblings back
    to back on one input) takes its own columns, a view.  So a decode step launches one GEMM for q, k
    and v instead of three (the per-token quantization is done once too), and the weights stream as
    one larger GEMM.  Anything else (a member called twice, or with another input) runs the joined
    GEMM again: always correct, only slower.  The output is released once every member has taken its
    columns."""

    def __init__(self, members: list):
        self.members = list(members)
        self.columns = {}
        start = 0
        for m in self.members:
            self.columns[id(m)] = (start, start + m.out_features)
            start += m.out_features
        self.n = start
        self.prepared = None
        self.launches = 0  # joined GEMMs run (tests read it)
        self._x = self._y = None
        self._version = -1
        self._taken: set[int] = set()

    def prepare(self, device: torch.device) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def _run(self, x2: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every subclass has its own
        """The joined GEMM of x2 [M, K]: [M, N] (all members' columns)."""
        raise NotImplementedError

    def output(self, member, x: torch.Tensor) -> torch.Tensor:
        """``member``'s [M, N_member] columns of the joined GEMM of x (a view)."""
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        if x is not self._x or version != self._version or id(member) in self._taken:
            self._y = self._run(x.reshape(-1, x.shape[-1]))
            self._x, self._version, self._taken = x, version, set()
            self.launches += 1
        self._taken.add(id(member))
        a, b = self.columns[id(member)]
        y = self._y[:, a:b]
        if len(self._taken) == len(self.members):
            self._x = self._y = None
        return y


class Layout:
    """One on-disk layout (see the module docstring).  Subclasses set ``name`` and ``doc``
    per instance and implement ``spec`` and ``module``; the rest has defaults."""

    def __init__(self, name: str, doc: str):
        self.name = name
        self.doc = doc

    def __repr__(self) -> str:
        return f"<layout {self.name}>"

    # ---- stored tensors
    def params(self, config: dict, shape_of: ShapeOf) -> dict:
        """This layer's parameters, from the method's recorded config (``quantization_config.config``)
        and the stored tensors' shapes."""
        return {}

    def spec(self, n: int, k: int, **params) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def check(self, name: str, tensors: dict[str, torch.Tensor], n: int, k: int, **params) -> list[str]:
        """Problems with the values (dtypes and shapes are checked against ``spec`` before)."""
        return []

    # ---- running
    def module(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, **params) -> QuantizedModule:
        raise NotImplementedError

    model_runtime: Callable | None = None  # (out, config, layers {name: module}, state, device) -> model

    # ---- export
    export_note: str | None = None  # what it exports to, for help texts ("W4A8 (pack-quantized)")

    def export_scheme(self, n: int, k: int, **params) -> dict:
        """compressed-tensors: {"format", "preset", "weights", "input_activations"} of this layer."""
        raise NotExportable(f"layout {self.name} has no compressed-tensors equivalent")

    def export_tensors(self, tensors: dict[str, torch.Tensor], n: int, k: int, scale_dtype: torch.dtype,
                       **params) -> tuple[dict[str, torch.Tensor], float]:
        """(suffix -> exported tensor, the largest relative rounding of any exported scale)."""
        raise NotExportable(f"layout {self.name} has no compressed-tensors equivalent")

    # ---- describing
    def figures(self, row: dict) -> dict[str, str]:
        """``qconvert inspect``'s columns for one report row: "α", "headroom", "extra"."""
        return {}

    def card_rows(self, config: dict) -> list[tuple[str, str]]:
        """Model-card rows ("weights", "activations", ...) from the method's recorded config."""
        return []

    def tags(self, config: dict) -> list[str]:
        return []

    def random_tensors(self, n: int, k: int, gen: torch.Generator, device, **params) -> dict[str, torch.Tensor]:
        raise QConvertError(f"layout {self.name} has no random-weight twin for synthetic benchmarks")


def finite_positive(name: str, t: torch.Tensor, what: str) -> list[str]:
    """A check shared by the layouts' per-channel scales."""
    return [] if (torch.isfinite(t).all() and (t > 0).all()) else [f"{name}.{what} holds values that are not finite and positive"]


def finite(name: str, t: torch.Tensor, what: str) -> list[str]:
    return [] if torch.isfinite(t).all() else [f"{name}.{what} holds NaN or Inf"]


def shape_check(name: str, tensors: dict[str, torch.Tensor], n: int, k: int) -> list[str]:
    """The stored ``shape`` tensor says the true [N, K]."""
    got = tensors["shape"].tolist()
    return [] if got == [n, k] else [f"{name}.shape is {got}, the config implies {[n, k]}"]


def padded(k: int, multiple: int) -> int:
    """K rounded up to a multiple (the stored width of a padded weight)."""
    return -(-k // multiple) * multiple
