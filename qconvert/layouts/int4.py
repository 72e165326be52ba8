"""Layouts ``w4a8-is`` (Integer Scale), ``w4a8-fs`` (float scale), ``w4a16`` and ``w4a16-zp`` (weight-only).

Stored (g the group size, Kp = K padded to a multiple of g, G = Kp / g; docs/format.md):

    qweight    uint8   [N, Kp/2]  int4 q in [-8, 7], two per byte, low nibble = even column;
                                  columns K..Kp-1 are 0
    shape      int64   [2]        the true [N, K]
    w4a8-is:   iscale  int32 [N, G] (ŝ >= 1), cscale float32 [N] (c), alpha_log2 int32 [1] (a)
               W[n, k] ~= q[n, k] · ŝ[n, k // g] · c[n] / 2^a
    w4a8-fs, w4a16: scales float16 [N, G]; W[n, k] ~= q[n, k] · s[n, k // g]
    w4a16-zp:  scales float16 [N, G], zeros int8 [N, G] in [-8, 7];
               W[n, k] ~= (q[n, k] - z[n, k // g]) · s[n, k // g]   (asymmetric groups)

At run time w4a8-* quantize activations per token to int8 (qconvert_kernels/w4a8/reference.py on
CPU, the CUDA kernels of qconvert_kernels/w4a8/cuda.py on a GPU); w4a16 and w4a16-zp dequantize
once and multiply in the activations' dtype.

The overflow bound of Integer Scale (a property of the stored tensors, checked by ``verify``):
for any int8 input |xq| <= 127, ``|A[m, n]| <= B[n] = 127 · Σ_j ŝ[n, j] · Σ_{k in j} |q[n, k]|``.
"""

from __future__ import annotations

import torch

from qconvert.errors import NoKernel, QConvertError
from qconvert.formats.packing import pack_int4_words, unpack_int4
from qconvert.layouts.base import (Layout, QuantizedModule, SiblingGroup, TensorSpec, finite, finite_positive, padded,
                                   shape_check)
from qconvert_kernels.w4a8 import reference as ref

INT32_MAX = 2**31 - 1
PACK_FORMAT = "pack-quantized"
WEIGHT_ONLY = ("w4a16", "w4a16-zp")
STORED = ("qweight", "iscale", "cscale", "scales", "zeros")  # a layer's tensors as OUT stores them


def group_abs_sums(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """T[n, j] = sum_{k in group j} |q[n, k]| as int64 [N, G]."""
    n = q.shape[0]
    return q.abs().reshape(n, -1, group_size).sum(-1, dtype=torch.int64)  # |-8| fits int8


def overflow_bound(iscale: torch.Tensor, abs_sums: torch.Tensor, xmax: int = ref.ACT_QMAX) -> torch.Tensor:
    """B[n] = xmax * sum_j ŝ[n, j] * T[n, j] (int64 [N]): the largest |A[m, n]| any input can give."""
    return xmax * (iscale.to(torch.int64) * abs_sums).sum(-1)


def float_scales(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The exact float group scales [N, G] of a stored layer, in float64.

    w4a8-is: iscale · cscale / 2^alpha_log2 (iscale < 2^31 and cscale, a float32, are exact in
    float64; their product has at most 55 significant bits, so float64 rounds it at most once,
    by 2^-53 relative; the power of two is exact).  Float layouts: the fp16 scales."""
    if "iscale" in tensors:
        a = int(tensors["alpha_log2"].reshape(-1)[0])
        return tensors["iscale"].double() * tensors["cscale"].double()[:, None] / float(2**a)
    return tensors["scales"].double()


class W4A8Linear(QuantizedModule):
    """Packed int4 group weights; w4a8-*: dynamic per-token int8 activations; w4a16: the weight
    dequantized once, y = x Ŵᵀ in the activations' dtype."""

    def __init__(self, layout: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 group_size: int | None = None):
        super().__init__()
        self.layout = layout
        self.out_features, self.in_features = (int(v) for v in tensors["shape"])
        groups = (tensors["iscale"] if layout == "w4a8-is" else tensors["scales"]).shape[1]
        self.group_size = group_size or tensors["qweight"].shape[1] * 2 // groups
        self.register_buffer("qweight", tensors["qweight"])
        if layout == "w4a8-is":
            self.register_buffer("iscale", tensors["iscale"])
            self.register_buffer("cscale", tensors["cscale"])
            self.alpha_log2 = int(tensors["alpha_log2"][0])
        else:
            self.register_buffer("scales", tensors["scales"])
        self.register_buffer("zeros", tensors["zeros"] if layout == "w4a16-zp" else None)
        self._bias(bias)
        self._prepared = None
        self._group: SiblingGEMM | None = None  # set by ``fuse``: one GEMM with its siblings

    def extra_repr(self):
        return f"{self.layout}, in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

    def weights_int8(self) -> torch.Tensor:
        """q int8 [N, Kp], the unpacked codes (kept within the CPU cache's budget)."""
        return self.derived("q", lambda: unpack_int4(self.qweight))

    def _weight_groups(self) -> torch.Tensor:
        """q as float32 [G, g, N], the order the reference GEMM multiplies in (kept likewise)."""
        return self.derived("qf", lambda: ref.weight_groups_float(self.weights_int8(), self.group_size))

    def check_cuda(self, name: str) -> None:
        """QConvertError unless the CUDA kernels can run this layer (group size, padding)."""
        from qconvert_kernels.w4a8 import cuda as kcuda

        if self.layout in WEIGHT_ONLY:
            return
        try:
            kcuda.check_repacked_shape(name, self.out_features, self.in_features, self.qweight.shape[1] * 2,
                                       self.group_size)
        except ValueError as e:
            raise NoKernel(f"{e}; this OUT runs on CPU only (re-quantize with --group-size 128 for the GPU)") from None

    def prepare_cuda(self, device: torch.device | None = None) -> None:
        """Repack the weights once into the order the kernels' fragments consume
        (qconvert_kernels/w4a8/repack.py), on ``device`` (default: where the stored tensors are;
        from host tensors the repack is written straight to the device); may synchronize, so it
        runs at load time, never inside a captured decode step."""
        from qconvert_kernels.w4a8 import cuda as kcuda

        device = torch.device(device) if device is not None else self.qweight.device
        if self._group is not None:
            return self._group.prepare(device)
        if self.layout in WEIGHT_ONLY or self._prepared is not None:
            return
        tensors = {"qweight": self.qweight, "shape": torch.tensor([self.out_features, self.in_features])}
        if self.layout == "w4a8-is":
            tensors.update(iscale=self.iscale, cscale=self.cscale, alpha_log2=torch.tensor([self.alpha_log2], dtype=torch.int32))
        else:
            tensors["scales"] = self.scales
        self._prepared = kcuda.prepare(self.layout, tensors, self.group_size, device)

    def keep_stored_on_host(self) -> None:
        """The W4A8 kernels read only the repacked copy ``prepare_cuda`` made: the stored packed
        weights and scales move to (or stay in) host memory and stay there through later moves of
        the module (``_apply``), where the CPU path still finds them, so a GPU holds the weights
        once (about 0.53 bytes per weight less).  Weight-only layouts read their stored tensors and
        keep them with the module."""
        if self.layout in WEIGHT_ONLY or (self._prepared is None and (self._group is None or self._group.prepared is None)):
            return
        self.hold_on_host(STORED)

    @staticmethod
    def _on_kernels(x: torch.Tensor, prepared, lazy: bool) -> bool:
        """Whether ``x`` runs on the kernels: on a GPU, yes (prepared there on first use); else where
        the kernels' copy was prepared on x's device (the CPU emulator's runs) or, ``lazy`` (a joined
        group), is still to be made there.  A copy prepared on another device (a GPU-loaded model
        moved to the CPU) leaves x to the reference path."""
        if x.is_cuda:
            return True
        return prepared.wq.device == x.device if prepared is not None else lazy

    def _forward_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        from qconvert_kernels.w4a8 import cuda as kcuda

        check_kernel_dtype(x2)
        self.prepare_cuda(x2.device)
        return kcuda.linear(x2, self._prepared)  # quantizer fused at M <= 64: one launch per linear

    @classmethod
    def fuse(cls, members: list[torch.nn.Module]) -> bool:
        """Siblings of one W4A8 layout, group size and K, with no input hook (an online
        transform would give each its own input), become one ``SiblingGEMM``."""
        first = members[0]
        if not all(isinstance(m, W4A8Linear) and m._group is None and m._prepared is None for m in members):
            return False
        if first.layout not in ("w4a8-is", "w4a8-fs") or any(m._forward_pre_hooks for m in members):
            return False
        if any((m.layout, m.group_size, m.in_features, m.qweight.shape[1]) !=
               (first.layout, first.group_size, first.in_features, first.qweight.shape[1]) for m in members):
            return False
        group = SiblingGEMM(members)
        for m in members:
            m._group = group
        return True

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        def make():
            q = self.weights_int8().float().reshape(self.out_features, -1, self.group_size)
            if self.zeros is not None:
                q = q - self.zeros.float()[..., None]
            w = (q * self.scales.float()[..., None]).reshape(self.out_features, -1)
            return w[:, : self.in_features].to(dtype).contiguous()  # not a view of the padded [N, Kp]

        return self.derived(("w", dtype), make)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout in WEIGHT_ONLY:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return torch.nn.functional.linear(x, self._dequantized(x.dtype), bias)
        shape = x.shape
        if self._group is not None and self._on_kernels(x, self._group.prepared, True):
            return self._finish(self._group.output(self, x), x, shape)
        x2 = x.reshape(-1, shape[-1])
        if self._on_kernels(x, self._prepared, False):
            return self._finish(self._forward_cuda(x2), x, shape)
        q, qf = self.weights_int8(), self._weight_groups()
        xq, t = ref.quantize_per_token_int8(x2, q.shape[1])
        if self.layout == "w4a8-is":
            y = ref.w4a8_is_gemm(xq, t, q, self.iscale, self.cscale, self.alpha_log2, self.group_size, qf)
        else:
            y = ref.w4a8_fs_gemm(xq, t, q, self.scales, self.group_size, qf)
        return self._finish(y, x, shape)


def check_kernel_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise QConvertError(f"the CUDA W4A8 kernels take float16 or bfloat16 activations, got {x.dtype}; "
                            "load with dtype=torch.float16 (the default on cuda)")


class SiblingGEMM(SiblingGroup):
    """Sibling W4A8 linears that read the same input (q/k/v, gate/up) run as one GEMM
    (``base.SiblingGroup``: the joined call and its members' column views).

    Exactness: w4a8-is joins the integer scales as stored and folds each member's amplifier into
    its channel factors, c' = c · 2^-a (one float32 product, the one the kernel makes), with
    a' = 0; the int32 accumulators do not depend on the split-K plan, so every output equals the
    member's own, bit for bit.  w4a8-fs: the joined layer's split-K plan may differ from a
    member's, so its float sums can round differently (equal to ``reference.w4a8_fs_gemm_split``
    in the joined plan's split order, as any w4a8-fs launch is)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The joined layer in the on-disk form ``cuda.prepare`` takes."""
        first = self.members[0]
        t = {"qweight": torch.cat([m.qweight for m in self.members]),
             "shape": torch.tensor([self.n, first.in_features], dtype=torch.int64)}
        if first.layout == "w4a8-is":
            t["iscale"] = torch.cat([m.iscale for m in self.members])
            t["cscale"] = torch.cat([m.cscale.float() * 2.0 ** -m.alpha_log2 for m in self.members])
            t["alpha_log2"] = torch.zeros(1, dtype=torch.int32)
        else:
            t["scales"] = torch.cat([m.scales for m in self.members])
        return t

    def prepare(self, device: torch.device) -> None:
        from qconvert_kernels.w4a8 import cuda as kcuda

        if self.prepared is None:
            first = self.members[0]
            self.prepared = kcuda.prepare(first.layout, self.tensors(), first.group_size, device)

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        from qconvert_kernels.w4a8 import cuda as kcuda

        check_kernel_dtype(x2)
        self.prepare(x2.device)
        return kcuda.linear(x2, self.prepared)


class Int4Layout(Layout):
    """w4a8-is / w4a8-fs / w4a16 / w4a16-zp: see the module docstring."""

    def __init__(self, name: str, doc: str, integer_scales: bool, act_bits: int, zero_points: bool = False):
        super().__init__(name, doc)
        self.integer_scales = integer_scales
        self.act_bits = act_bits
        self.zero_points = zero_points
        self.export_note = f"W4A{act_bits}{'_ASYM' if zero_points else ''} (pack-quantized)"

    def params(self, config: dict, shape_of) -> dict:
        g = config.get("group_size")
        if not (isinstance(g, int) and g > 0):
            raise QConvertError(f"config.json: quantization_config.config lacks the group size of layout {self.name}")
        return {"group_size": g}

    def spec(self, n: int, k: int, group_size: int) -> dict[str, TensorSpec]:
        kp = padded(k, group_size)
        spec = {"qweight": TensorSpec(torch.uint8, (n, kp // 2), "int4 weights, two per byte, low nibble first"),
                "shape": TensorSpec(torch.int64, (2,), "the true [N, K]")}
        if self.integer_scales:
            spec.update(iscale=TensorSpec(torch.int32, (n, kp // group_size), "integer group scales >= 1"),
                        cscale=TensorSpec(torch.float32, (n,), "per-channel factor c"),
                        alpha_log2=TensorSpec(torch.int32, (1,), "the amplifier's exponent a"))
        else:
            spec["scales"] = TensorSpec(torch.float16, (n, kp // group_size), "float group scales")
        if self.zero_points:
            spec["zeros"] = TensorSpec(torch.int8, (n, kp // group_size), "integer group zero points in [-8, 7]")
        return spec

    def check(self, name, tensors, n, k, group_size) -> list[str]:
        problems = shape_check(name, tensors, n, k)
        if not self.integer_scales:
            problems += finite(name, tensors["scales"], "scales")
            z = tensors.get("zeros")
            if self.zero_points and z is not None and z.numel() and (int(z.min()) < -8 or int(z.max()) > 7):
                problems.append(f"{name}.zeros holds values outside [-8, 7]")
            return problems
        a, s_hat = int(tensors["alpha_log2"][0]), tensors["iscale"]
        if not 0 <= a <= 30:
            problems.append(f"{name}.alpha_log2 is {a}, outside 0..30")
        problems += finite_positive(name, tensors["cscale"], "cscale")
        if int(s_hat.min()) < 1:
            return problems + [f"{name}.iscale holds values below 1"]
        q8 = unpack_int4(tensors["qweight"])
        if (q8[:, k:] != 0).any():
            return problems + [f"{name}.qweight has non-zero padding columns"]
        bound = int(overflow_bound(s_hat, group_abs_sums(q8, group_size)).max())
        if bound > INT32_MAX:
            problems.append(f"{name}: the stored integer scales can overflow int32 (bound {bound})")
        return problems

    def module(self, tensors, bias, group_size) -> W4A8Linear:
        return W4A8Linear(self.name, tensors, bias, group_size)

    # ---- export: compressed-tensors pack-quantized, symmetric int4 groups
    def export_scheme(self, n, k, group_size) -> dict:
        weights = {"num_bits": 4, "type": "int", "symmetric": not self.zero_points, "strategy": "group",
                   "group_size": group_size, "dynamic": False}
        acts = None if self.act_bits == 16 else {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                                 "dynamic": True}
        return {"format": PACK_FORMAT, "weights": weights, "input_activations": acts,
                "preset": ("W4A16_ASYM" if self.zero_points else "W4A16") if self.act_bits == 16 else "W4A8"}

    def export_tensors(self, tensors, n, k, scale_dtype, group_size):
        """weight_packed int32 [N, K/8] (compressed-tensors' int4 words), weight_scale [N, G] in
        ``scale_dtype`` (the exact float scale rounded once), weight_shape int64 [2]; w4a16-zp also
        weight_zero_point int32 [N/8, G] (the zero points packed as int4 words along N, as
        compressed-tensors packs them: vLLM's uint4 weights with zero points)."""
        q = unpack_int4(tensors["qweight"])[:, :k]
        exact = float_scales(tensors)
        stored = exact.to(scale_dtype)
        if not torch.isfinite(stored).all() or bool((stored == 0).any()):
            raise QConvertError(f"a group scale of {float(exact.min()):.3g}..{float(exact.max()):.3g} does not fit "
                                f"{str(scale_dtype).removeprefix('torch.')} (it would become 0 or inf); "
                                "export with --scale-dtype float32")
        rel = float(((stored.double() - exact).abs() / exact).max()) if exact.numel() else 0.0
        out = {"weight_packed": pack_int4_words(q.contiguous()), "weight_scale": stored.contiguous(),
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        if self.zero_points:
            out["weight_zero_point"] = pack_int4_words(tensors["zeros"].T.contiguous()).T.contiguous()
        return out, rel

    # ---- describing
    def figures(self, row: dict) -> dict[str, str]:
        if not self.integer_scales:
            return {}
        return {"α": f"2^{row['alpha_log2']}", "headroom": f"{row['headroom_bits']:.2f}"}

    def card_rows(self, config: dict) -> list[tuple[str, str]]:
        g = config.get("group_size")
        scales = ("integer group scales (an amplifier α = 2^k makes them integers, so group sums stay in int32 and "
                  "convert to float once)") if self.integer_scales else "fp16 group scales"
        sym = "asymmetric (an int4 zero point per group)" if self.zero_points else "symmetric"
        rows = [("weights", f"int4, {sym}, groups of {g} along the input dimension, {scales}")]
        if self.act_bits == 16:
            rows.append(("activations", "kept in 16-bit floating point (weight-only)"))
        else:
            rows.append(("activations", "int8, dynamic, per-token, symmetric, quantized as the model runs"))
        return rows

    def tags(self, config: dict) -> list[str]:
        tags = ["int4", f"w4a{self.act_bits}"] + (["int8-activations"] if self.act_bits < 16 else [])
        tags += ["zero-point"] if self.zero_points else []
        return tags + (["integer-scale"] if self.integer_scales else [])

    def random_tensors(self, n, k, gen, device, group_size=128) -> dict[str, torch.Tensor]:
        """Random int4 weights; integer scales in [1, 128] at α = 2^7 (no int32 wrap for K <= 16384)."""
        kp = padded(k, group_size)
        t = {"qweight": torch.randint(0, 256, (n, kp // 2), generator=gen, device=device, dtype=torch.uint8),
             "shape": torch.tensor([n, k], dtype=torch.int64)}
        s = torch.randint(1, 129, (n, kp // group_size), generator=gen, device=device, dtype=torch.int32)
        if self.integer_scales:
            return {**t, "iscale": s, "cscale": torch.rand(n, generator=gen, device=device) * 0.01,
                    "alpha_log2": torch.tensor([7], dtype=torch.int32)}
        t["scales"] = (s.float() / 128 * 0.01).half()
        if self.zero_points:
            t["zeros"] = torch.randint(-8, 8, s.shape, generator=gen, device=device, dtype=torch.int8)
        return t


W4A8_IS = Int4Layout("w4a8-is", "Integer Scale W4A8: int4 groups with integer scales, int8 per-token activations",
                     integer_scales=True, act_bits=8)
W4A8_FS = Int4Layout("w4a8-fs", "W4A8 with fp16 group scales (the float-scale counterpart)", integer_scales=False, act_bits=8)
W4A16 = Int4Layout("w4a16", "int4 groups with fp16 scales, activations in float (weight-only)", integer_scales=False, act_bits=16)
W4A16_ZP = Int4Layout("w4a16-zp", "asymmetric int4 groups (fp16 scales, int4 zero points), activations in float "
                      "(weight-only)", integer_scales=False, act_bits=16, zero_points=True)
