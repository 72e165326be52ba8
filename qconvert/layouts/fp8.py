"""Layouts ``fp4-fp8`` and ``fp8-fp8`` (ZeroQuant-FP): FP4 / FP8 weights, FP8 per-token activations.

Stored (docs/format.md):

    fp4-fp8   qweight uint8 [N, Kp/2]  E2M1 codes, two per byte, low nibble = even column
              (Kp = K padded to the group size g); sexp int8 [N, G] group exponents e in
              [-64, 63]; cscale float32 [N];  W[n, k] ~= w[n, k] · 2^e[n, k // g] · c[n]
    fp8-fp8   qweight float8_e4m3fn [N, Kp] (Kp = K padded to 64); wscale float32 [N]
    both      shape int64 [2]; optional LoRC factors lorc_u fp16 [N, r], lorc_v fp16 [r, K],
              applied as y += ((xq · t) Vᵀ) Uᵀ on the same FP8 activations

On CPU the forward is qconvert_kernels/fp8/reference.py; on an sm_89+ GPU the kernels of
qconvert_kernels/fp8/cuda.py, and for fp4-fp8 (group size 32..1024) the repacked weights of
qconvert_kernels/fp8/fp8_repacked.cu (through w4a8/cuda.py), which ``prepare_cuda`` makes at load
time: at decode (M <= 64) the repacked decode kernel (split-K, a deep weight pipeline, the E4M3
quantizer fused in, one launch per linear); above, the weights widened to E4M3 in one launch and an
FP8 GEMM with per-row scales (torch._scaled_mm), where every row's group exponents span at most 14
(``w4a8.cuda.widen_plan``).  Such a layer keeps its stored tensors in host memory
(``keep_stored_on_host``: the GPU holds the FP4 weights once); a layer with a wider span runs
fp8_gemm.cu's kernel above 64 tokens and keeps them on the GPU beside the repacked copy.  fp8-fp8
runs every M on torch._scaled_mm with per-row scales (t per token, wscale per channel:
``fp8.cuda.prepare_fp8_fp8`` / ``fp8_fp8_scaled``) where the device's torch has that GEMM, its
stored tensors likewise kept on the host; elsewhere on fp8_gemm.cu's kernel.
"""

from __future__ import annotations

import torch

from qconvert.errors import NoKernel, QConvertError
from qconvert.formats.fp4 import codes_to_values, unpack_fp4
from qconvert.glue import kernel_device
from qconvert.layouts.base import (Layout, NotExportable, QuantizedModule, SiblingGroup, TensorSpec, finite,
                                   finite_positive, padded, shape_check)
from qconvert_kernels.fp8 import reference as ref8

E_MIN, E_MAX = -64, 63  # fp4-fp8 group exponents, stored as int8; 2^e stays a normal float32 for any partial
FP8_K_MULTIPLE = ref8.FP8_CHUNK  # fp8-fp8 pads K to its accumulation chunk
FP8_ACTIVATIONS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}


class FP8Linear(QuantizedModule):
    """Dynamic per-token FP8 (E4M3) activations times FP4 or FP8 weights (see the module docstring)."""

    def __init__(self, layout: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 group_size: int | None = None):
        super().__init__()
        self.layout = layout
        self.out_features, self.in_features = (int(v) for v in tensors["shape"])
        qw = tensors["qweight"]
        self.register_buffer("qweight", qw)
        if layout == "fp4-fp8":
            self.kp = qw.shape[1] * 2
            self.group_size = group_size or self.kp // tensors["sexp"].shape[1]
            self.register_buffer("sexp", tensors["sexp"])
            self.register_buffer("cscale", tensors["cscale"])
        else:
            self.kp = qw.shape[1]
            self.group_size = None
            self.register_buffer("wscale", tensors["wscale"])
        self._prepared = None  # the copy the GPU paths read (prepare_cuda)
        self._group: FP8Siblings | None = None  # set by ``fuse``: one GEMM with its siblings
        self._failed: set[str] = set()  # devices where no copy could be made (not tried again)
        u, v = tensors.get("lorc_u"), tensors.get("lorc_v")
        self.lorc_rank = 0 if u is None else int(u.shape[1])
        self.register_buffer("lorc_u", u)
        self.register_buffer("lorc_v", v)
        self._bias(bias)

    def extra_repr(self):
        return (f"{self.layout}, in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, lorc_rank={self.lorc_rank}")

    def check_cuda(self, name: str) -> None:
        """QConvertError unless the FP8 kernels can run this layer (arch, group size)."""
        from qconvert_kernels.fp8 import cuda as cuda_fp8

        try:
            cuda_fp8.check_device(name)
            cuda_fp8.check_gemm_shape(name, 1, self.out_features, self.kp, self.group_size or cuda_fp8.FP8_CHUNK)
        except ValueError as e:
            raise NoKernel(f"{e}; this OUT runs on CPU only") from None

    def _stored(self) -> dict[str, torch.Tensor]:
        """The layer in the on-disk form the prepare functions take (LoRC not included)."""
        t = {"qweight": self.qweight, "shape": torch.tensor([self.out_features, self.in_features])}
        t.update({"sexp": self.sexp, "cscale": self.cscale} if self.layout == "fp4-fp8" else {"wscale": self.wscale})
        return t

    def prepare_cuda(self, device: torch.device | None = None) -> None:
        """Make the copy the GPU paths read on ``device`` (default: where the stored tensors are, or
        nothing where a copy exists); may synchronize, so a load runs it (``prepare``; a joined
        group's, for a fused member).  A copy on another device is made again on this one (a module
        moved between GPUs); a device where none can be made is not tried again.  A forward on a GPU
        asks for it too: a model moved there without ``runtime.load`` is prepared at its first
        forward (which may then synchronize: warm up before capturing a CUDA graph) and keeps its
        stored tensors there beside the copy."""
        if device is None:
            if (self._group.prepared if self._group is not None else self._prepared) is not None:
                return
            device = self.qweight.device
        device = kernel_device(device)
        if self._group is not None:
            return self._group.prepare(device)
        def make():
            tensors = self._stored()
            if self.lorc_rank and self.layout == "fp4-fp8":  # at decode the kernels add LoRC's term (rank <= LORC_MAX_R)
                tensors.update(lorc_u=self.lorc_u, lorc_v=self.lorc_v)
            return prepare(self.layout, tensors, self.group_size, device)

        self._prepared = prepared_on(self.layout, self._prepared, self._failed, device, make)

    def keep_stored_on_host(self) -> None:
        """Prepared (alone or in a joined group) so that the GPU paths read only the prepared copy:
        the stored tensors move to (and stay in) host memory through later moves of the module, where
        the CPU path still finds them (the GPU holds the weights once).  fp8-fp8: once prepared (an
        activation dtype torch._scaled_mm cannot output runs fp8_gemm.cu's kernel on the same copy);
        fp4-fp8: where fp16 and bf16 both run on it at every M."""
        p = self._group.prepared if self._group is not None else self._prepared
        if self.layout == "fp8-fp8" and p is not None:
            self.hold_on_host(("qweight", "wscale"))
        elif serves(self.layout, p, torch.float16) and serves(self.layout, p, torch.bfloat16):
            self.hold_on_host(("qweight", "sexp", "cscale"))

    def _fp8_weights(self, device: torch.device):
        """fp8-fp8's weights and scales for fp8_gemm.cu's kernel: this layer's rows of the prepared
        copy (its own or its group's) where that is on ``device``, else the stored tensors."""
        p, rows = self._prepared, (0, self.out_features)
        if self._group is not None:
            p, rows = self._group.prepared, self._group.columns[id(self)]
        if p is not None and p.w8.device == device:
            return p.w8[rows[0]:rows[1]], p.wscale[rows[0]:rows[1]]
        return self.qweight, self.wscale

    def _on_repacked(self, x2: torch.Tensor) -> bool:
        """Whether x2 runs on this layer's prepared copy: made on x2's device (the GPU, or the CPU for
        the emulator's runs) and serving its dtype and row count."""
        return on_prepared(self.layout, self._prepared, x2)

    def _forward_repacked(self, x2: torch.Tensor) -> torch.Tensor:
        lorc = (self.lorc_u, self.lorc_v) if self.lorc_rank else None
        return run_prepared(self.layout, self._prepared, x2, lorc, self.kp)

    @classmethod
    def fuse(cls, members: list[torch.nn.Module]) -> bool:
        """Siblings of one FP8 layout, K (and group size) without an input hook become one
        ``FP8Siblings``: one quantization and one GEMM on the GPU for q/k/v and for gate/up.  fp4-fp8
        members with LoRC join where their ranks add up to at most the decode kernel's LORC_MAX_R (it
        adds the joined term in its epilogue)."""
        from qconvert_kernels.w4a8.cuda import LORC_MAX_R

        first = members[0]
        if not all(isinstance(m, FP8Linear) and m._group is None and m._prepared is None
                   and not m._forward_pre_hooks for m in members):
            return False
        if any((m.layout, m.kp, m.group_size, m.in_features) != (first.layout, first.kp, first.group_size, first.in_features)
               for m in members):
            return False
        if first.layout == "fp4-fp8" and sum(m.lorc_rank for m in members) > LORC_MAX_R:
            return False
        group = FP8Siblings(members)
        for m in members:
            m._group = group
        return True

    def _forward_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        from qconvert_kernels.fp8 import cuda as cuda_fp8

        xq, t = cuda_fp8.quantize_per_token_fp8(x2, self.kp)
        if self.layout == "fp4-fp8":
            y = cuda_fp8.fp4_fp8_gemm(xq, t, self.qweight, self.sexp, self.cscale, self.group_size, x2.dtype)
        else:
            y = cuda_fp8.fp8_fp8_gemm(xq, t, *self._fp8_weights(x2.device), x2.dtype)
        if self.lorc_rank:
            y = (y.float() + ref8.lorc_term(xq, t, self.lorc_u, self.lorc_v)).to(x2.dtype)
        return y

    def _forward_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        xq, t = ref8.quantize_per_token_fp8(x2, self.kp)
        if self.layout == "fp4-fp8":
            wg = self.derived("wg", lambda: ref8.weight_groups(codes_to_values(unpack_fp4(self.qweight)), self.group_size))
            y = ref8.fp4_fp8_gemm(xq, t, wg, self.sexp, self.cscale)
        else:
            y = ref8.fp8_fp8_gemm(xq, t, self.qweight, self.wscale)
        if self.lorc_rank:
            y = y + ref8.lorc_term(xq, t, self.lorc_u, self.lorc_v)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cuda:
            self.prepare_cuda(x.device)  # a no-op once prepared there (at load time)
        if self._group is not None and on_prepared(self.layout, self._group.prepared, x2):
            return self._finish(self._group.output(self, x), x, shape)
        if self._on_repacked(x2):
            return self._finish(self._forward_repacked(x2.contiguous()), x, shape)
        return self._finish(self._forward_cuda(x2) if x.is_cuda else self._forward_cpu(x2), x, shape)


def _quantize(x2: torch.Tensor, kp: int):
    if x2.is_cuda:
        from qconvert_kernels.fp8 import cuda as cuda_fp8

        return cuda_fp8.quantize_per_token_fp8(x2, kp)
    return ref8.quantize_per_token_fp8(x2, kp)  # the kernel's bits (the emulator's runs)


def held_on(layout: str, p) -> torch.device | None:
    """Where the prepared copy ``p`` is (None: no copy)."""
    return None if p is None else (p.w8 if layout == "fp8-fp8" else p.wq).device


def prepared_on(layout: str, p, failed: set, device: torch.device, make):
    """``p`` where it is on ``device``; else ``make()`` there, or where none can be made there (that
    device then goes into ``failed`` and is not tried again: a failed row-wise GEMM probe is not
    cached) ``p`` as it was, so that its own device keeps it."""
    if (p is not None and held_on(layout, p) == device) or str(device) in failed:
        return p
    made = make()
    if made is None:
        failed.add(str(device))
        return p
    return made


def prepare(layout: str, tensors: dict, group_size: int | None, device: torch.device):
    """The copy the GPU paths read of one (or a joined) layer, or None where none serves: fp4-fp8 the
    repacked weights (group sizes 32..1024; LoRC's factors too when given), fp8-fp8 the weights for
    torch._scaled_mm (where the device's torch has that GEMM)."""
    if layout == "fp8-fp8":
        from qconvert_kernels.fp8 import cuda as cuda_fp8

        return cuda_fp8.prepare_fp8_fp8(tensors["qweight"], tensors["wscale"], device)
    from qconvert_kernels.w4a8 import cuda as kcuda

    n, k = (int(v) for v in tensors["shape"])
    try:
        kcuda.check_repacked_shape("fp4-fp8", n, k, tensors["qweight"].shape[1] * 2, group_size)
    except ValueError:
        return None
    return kcuda.prepare("fp4-fp8", tensors, group_size, device)


def serves(layout: str, p, dtype, m: int | None = None) -> bool:
    """Whether the prepared copy ``p`` runs m tokens (every m: None) of ``dtype``: fp8-fp8 where
    torch._scaled_mm takes that output; fp4-fp8 at decode (M <= 64) or with a widened prefill."""
    from qconvert_kernels.w4a8 import cuda as kcuda

    if p is None or dtype not in (torch.float16, torch.bfloat16):
        return False
    if layout == "fp8-fp8":
        return p.runs(dtype)
    return (m is not None and m <= kcuda.DECODE_MAX_M) or p.prefills(dtype)


def on_prepared(layout: str, p, x2: torch.Tensor) -> bool:
    """Whether x2 runs on ``p``: made on x2's device and serving its dtype and row count."""
    return held_on(layout, p) == x2.device and serves(layout, p, x2.dtype, x2.shape[0])


def run_prepared(layout: str, p, x2: torch.Tensor, lorc=None, kp: int = 0) -> torch.Tensor:
    """y [M, N] of x2 on the prepared copy ``p``, plus LoRC's term where ``lorc`` = (U [N, r], V [r, K])
    is given: on the same E4M3 activations (the fp4-fp8 decode kernel adds the term itself where
    ``p`` holds its factors; else the activations are quantized once more, to ``kp`` columns)."""
    from qconvert_kernels.w4a8 import cuda as kcuda

    quantized = None
    if layout == "fp8-fp8":
        from qconvert_kernels.fp8 import cuda as cuda_fp8

        quantized = _quantize(x2, p.kp)
        y = cuda_fp8.fp8_fp8_scaled(*quantized, p, x2.dtype)
    elif x2.shape[0] <= kcuda.DECODE_MAX_M:
        y = kcuda.linear(x2, p)  # E4M3 quantizer fused in: one launch (two with LoRC, its term added inside)
        if p.lorc_u is not None:
            return y
    else:
        quantized = _quantize(x2, p.kq)
        y = kcuda.zq_prefill(*quantized, p, x2.dtype)
    if lorc is None:
        return y
    xq, t = quantized or _quantize(x2, kp)
    return (y.float() + ref8.lorc_term(xq, t, *lorc)).to(x2.dtype)


class FP8Siblings(SiblingGroup):
    """Sibling FP8 linears that read the same input run as one GEMM (``base.SiblingGroup``): their
    stored tensors joined along N and prepared once (``prepare``), one quantization of the input.
    fp8-fp8 and the fp4-fp8 prefill: one torch._scaled_mm over the joined rows, whose sums may be
    ordered otherwise than a member's own launch (the FP8 tolerance, as any such GEMM); fp4-fp8 at
    decode: the repacked decode kernel in the joined layer's split-K plan (equal to
    ``reference.fp4_fp8_gemm_split`` in that plan's order).  LoRC: the members' V stacked and their U
    placed block-diagonally (``lorc``), so each output's term is the member's own sum with zeros
    added (h of each member's rows is its own: each row of h depends only on its row of V)."""

    def __init__(self, members: list[FP8Linear]):
        super().__init__(members)
        self._failed: set[str] = set()  # devices where no copy could be made (not tried again)
        self._lorc = None  # the joined (U, V) on the prepared copy's device

    def lorc(self):
        """(U [N, R] block-diagonal, V [R, K] stacked) of the members' LoRC factors, or None."""
        ranked = [m for m in self.members if m.lorc_rank]
        if not ranked:
            return None
        u = torch.zeros((self.n, sum(m.lorc_rank for m in ranked)), dtype=ranked[0].lorc_u.dtype)
        r = 0
        for m in ranked:
            a, b = self.columns[id(m)]
            u[a:b, r:r + m.lorc_rank] = m.lorc_u.to(device=u.device, dtype=u.dtype)
            r += m.lorc_rank
        return u, torch.cat([m.lorc_v.to(device=u.device, dtype=ranked[0].lorc_v.dtype) for m in ranked])

    def tensors(self) -> dict[str, torch.Tensor]:
        stored = [m._stored() for m in self.members]
        t = {key: torch.cat([s[key] for s in stored]) for key in stored[0] if key != "shape"}
        t["shape"] = torch.tensor([self.n, self.members[0].in_features], dtype=torch.int64)
        lorc = self.lorc()
        if lorc is not None and self.members[0].layout == "fp4-fp8":  # the decode kernel adds the joined term
            t["lorc_u"], t["lorc_v"] = lorc
        return t

    def prepare(self, device: torch.device) -> None:
        first, device = self.members[0], kernel_device(device)
        before = self.prepared
        self.prepared = prepared_on(first.layout, self.prepared, self._failed, device,
                                    lambda: prepare(first.layout, self.tensors(), first.group_size, device))
        if self.prepared is not before:
            lorc = self.lorc() if self.prepared is not None else None
            self._lorc = None if lorc is None else tuple(f.to(device) for f in lorc)

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        first = self.members[0]
        return run_prepared(first.layout, self.prepared, x2, self._lorc, first.kp)


class FP8Layout(Layout):
    """fp4-fp8 / fp8-fp8: see the module docstring."""

    def __init__(self, name: str, doc: str, fp4: bool):
        super().__init__(name, doc)
        self.fp4 = fp4
        self.export_note = None if fp4 else "FP8 (float-quantized; without LoRC)"

    def params(self, config: dict, shape_of) -> dict:
        u, v = shape_of("lorc_u"), shape_of("lorc_v")
        rank = u[1] if u is not None and len(u) == 2 else (v[0] if v is not None and len(v) == 2 else 0)
        if not self.fp4:
            return {"lorc_rank": rank}
        g = config.get("group_size")
        if not (isinstance(g, int) and g > 0):
            raise QConvertError(f"config.json: quantization_config.config lacks the group size of layout {self.name}")
        return {"group_size": g, "lorc_rank": rank}

    def spec(self, n: int, k: int, lorc_rank: int = 0, group_size: int | None = None) -> dict[str, TensorSpec]:
        if self.fp4:
            kp = padded(k, group_size)
            spec = {"qweight": TensorSpec(torch.uint8, (n, kp // 2), "E2M1 codes, two per byte, low nibble first"),
                    "shape": TensorSpec(torch.int64, (2,), "the true [N, K]"),
                    "sexp": TensorSpec(torch.int8, (n, kp // group_size), "group exponents e"),
                    "cscale": TensorSpec(torch.float32, (n,), "per-channel scale c")}
        else:
            kp = padded(k, FP8_K_MULTIPLE)
            spec = {"qweight": TensorSpec(torch.float8_e4m3fn, (n, kp), "E4M3 weights, K padded to 64"),
                    "shape": TensorSpec(torch.int64, (2,), "the true [N, K]"),
                    "wscale": TensorSpec(torch.float32, (n,), "per-channel scale")}
        if lorc_rank:
            spec.update(lorc_u=TensorSpec(torch.float16, (n, lorc_rank), "LoRC U"),
                        lorc_v=TensorSpec(torch.float16, (lorc_rank, k), "LoRC V"))
        return spec

    def check(self, name, tensors, n, k, lorc_rank=0, group_size=None) -> list[str]:
        problems = shape_check(name, tensors, n, k)
        q = tensors["qweight"]
        if self.fp4:
            e = tensors["sexp"]
            if (unpack_fp4(q)[:, k:] != 0).any():
                problems.append(f"{name}.qweight has non-zero padding columns")
            if e.numel() and not (E_MIN <= int(e.min()) and int(e.max()) <= E_MAX):
                problems.append(f"{name}.sexp holds exponents outside {E_MIN}..{E_MAX}")
            problems += finite_positive(name, tensors["cscale"], "cscale")
        else:
            if torch.isnan(q.float()).any() or (q.view(torch.uint8)[:, k:] != 0).any():
                problems.append(f"{name}.qweight holds NaN codes or non-zero padding columns")
            problems += finite_positive(name, tensors["wscale"], "wscale")
        for part in ("lorc_u", "lorc_v") if lorc_rank else ():
            problems += finite(name, tensors[part], part)
        return problems

    def module(self, tensors, bias, lorc_rank=0, group_size=None) -> FP8Linear:
        return FP8Linear(self.name, tensors, bias, group_size)

    # ---- export: fp8-fp8 without LoRC is compressed-tensors' FP8 (float-quantized) scheme
    def export_scheme(self, n, k, lorc_rank=0, group_size=None) -> dict:
        if self.fp4:
            raise NotExportable("layout fp4-fp8 (E2M1 with power-of-two group exponents under a float32 row scale) has "
                                "no compressed-tensors equivalent (its nvfp4 format has FP8 scales per 16 values); the "
                                "nearest exportable schemes are zqfp-w8a8 (FP8) and is-w4a8 / w4a16-gptq (int4)")
        if lorc_rank:
            raise NotExportable(f"layout fp8-fp8 with LoRC (rank {lorc_rank}) has no compressed-tensors equivalent "
                                "(no low-rank term); re-quantize with --lorc-rank 0 to export it as FP8")
        return {"format": "float-quantized", "preset": "FP8_DYNAMIC",
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
                "input_activations": dict(FP8_ACTIVATIONS)}

    def export_tensors(self, tensors, n, k, scale_dtype, lorc_rank=0, group_size=None):
        """weight float8_e4m3fn [N, K] (the stored codes, padding dropped), weight_scale [N, 1]."""
        exact = tensors["wscale"].double()
        stored = exact.to(scale_dtype)
        rel = float(((stored.double() - exact).abs() / exact).max()) if exact.numel() else 0.0
        return {"weight": tensors["qweight"][:, :k].contiguous(), "weight_scale": stored[:, None].contiguous()}, rel

    # ---- describing
    def figures(self, row: dict) -> dict[str, str]:
        return {"extra": f"LoRC r{row['lorc_rank']}"} if row.get("lorc_rank") else {}

    def card_rows(self, config: dict) -> list[tuple[str, str]]:
        if self.fp4:
            rows = [("weights", f"FP4 (E2M1), groups of {config.get('group_size')} along the input dimension, "
                                "scales: float32 per channel x power-of-two per group")]
        else:
            rows = [("weights", "FP8 (E4M3), per output channel, scales: float32")]
        if config.get("lorc_rank"):
            rows.append(("low-rank compensation", f"LoRC rank {config['lorc_rank']}: W - Ŵ ≈ U V kept in fp16, "
                                                  "added as (x Vᵀ) Uᵀ on the same activations"))
        rows.append(("activations", "FP8 (E4M3), dynamic, per-token, quantized as the model runs"))
        return rows

    def tags(self, config: dict) -> list[str]:
        tags = ["fp4", "w4a8"] if self.fp4 else ["fp8", "w8a8"]
        return tags + ["fp8-activations", "zeroquant-fp"] + (["lorc"] if config.get("lorc_rank") else [])


FP4_FP8 = FP8Layout("fp4-fp8", "ZeroQuant-FP: FP4 (E2M1) group weights with power-of-two group factors, FP8 activations",
                    fp4=True)
FP8_FP8 = FP8Layout("fp8-fp8", "ZeroQuant-FP: FP8 (E4M3) per-channel weights, FP8 per-token activations", fp4=False)
