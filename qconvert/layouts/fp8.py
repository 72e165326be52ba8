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

from qconvert.errors import QConvertError
from qconvert.formats.fp4 import codes_to_values, unpack_fp4
from qconvert.layouts.base import (Layout, NotExportable, QuantizedModule, TensorSpec, finite, finite_positive, padded,
                                   shape_check)
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
        self._prepared = None  # fp4-fp8: the repacked copy (prepare_cuda)
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
            raise QConvertError(f"{e}; this OUT runs on CPU only") from None

    def prepare_cuda(self, device: torch.device | None = None) -> None:
        """Make the copy the GPU paths read, once, on ``device`` (default: where the stored tensors
        are); may synchronize, so it runs at load time.  fp4-fp8: the weights repacked for the decode
        kernel (a group size outside its 32..1024 leaves every M on fp8_gemm.cu's kernel); fp8-fp8:
        the weights padded to 16 rows for torch._scaled_mm (none where the device's torch has no
        row-wise FP8 GEMM: fp8_gemm.cu's kernel then)."""
        if self._prepared is not None:
            return
        device = torch.device(device) if device is not None else self.qweight.device
        if self.layout == "fp8-fp8":
            from qconvert_kernels.fp8 import cuda as cuda_fp8

            self._prepared = cuda_fp8.prepare_fp8_fp8(self.qweight, self.wscale, device)
            return
        from qconvert_kernels.w4a8 import cuda as kcuda

        try:
            kcuda.check_repacked_shape("fp4-fp8", self.out_features, self.in_features, self.kp, self.group_size)
        except ValueError:
            return
        tensors = {"qweight": self.qweight, "sexp": self.sexp, "cscale": self.cscale,
                   "shape": torch.tensor([self.out_features, self.in_features])}
        if self.lorc_rank:  # at decode the kernels add LoRC's term themselves (rank <= LORC_MAX_R)
            tensors.update(lorc_u=self.lorc_u, lorc_v=self.lorc_v)
        self._prepared = kcuda.prepare("fp4-fp8", tensors, self.group_size, device)

    def _serves(self, dtype, m: int | None = None) -> bool:
        """Whether the prepared copy runs m tokens (every m: None) of ``dtype``: fp8-fp8 where
        torch._scaled_mm takes that output; fp4-fp8 at decode (M <= 64) or with a widened prefill."""
        from qconvert_kernels.w4a8 import cuda as kcuda

        p = self._prepared
        if p is None or dtype not in (torch.float16, torch.bfloat16):
            return False
        if self.layout == "fp8-fp8":
            return p.runs(dtype)
        return (m is not None and m <= kcuda.DECODE_MAX_M) or p.prefills(dtype)

    def keep_stored_on_host(self) -> None:
        """Prepared so that every M of fp16 and bf16 alike reads only the prepared copy: the stored
        tensors move to (and stay in) host memory through later moves of the module, where the CPU
        path still finds them (the GPU holds the weights once)."""
        if self._serves(torch.float16) and self._serves(torch.bfloat16):
            self.hold_on_host(("qweight", "sexp", "cscale") if self.layout == "fp4-fp8" else ("qweight", "wscale"))

    def _on_repacked(self, x2: torch.Tensor) -> bool:
        """Whether x2 runs on the prepared copy: made on x2's device (the GPU, or the CPU for the
        emulator's runs) and serving its dtype and row count."""
        p = self._prepared
        held = None if p is None else (p.w8 if self.layout == "fp8-fp8" else p.wq)
        return held is not None and held.device == x2.device and self._serves(x2.dtype, x2.shape[0])

    def _quantize(self, x2: torch.Tensor, kp: int):
        if x2.is_cuda:
            from qconvert_kernels.fp8 import cuda as cuda_fp8

            return cuda_fp8.quantize_per_token_fp8(x2, kp)
        return ref8.quantize_per_token_fp8(x2, kp)  # the kernel's bits (the emulator's runs)

    def _forward_repacked(self, x2: torch.Tensor) -> torch.Tensor:
        from qconvert_kernels.w4a8 import cuda as kcuda

        p, xq = self._prepared, None
        if self.layout == "fp8-fp8":
            from qconvert_kernels.fp8 import cuda as cuda_fp8

            xq, t = self._quantize(x2, self.kp)
            y = cuda_fp8.fp8_fp8_scaled(xq, t, p, x2.dtype)
        elif x2.shape[0] <= kcuda.DECODE_MAX_M:
            y = kcuda.linear(x2, p)  # E4M3 quantizer fused in: one launch (two with LoRC, its term added inside)
            if p.lorc_u is not None:
                return y
        else:
            xq, t = self._quantize(x2, p.kq)
            y = kcuda.zq_prefill(xq, t, p, x2.dtype)
        if self.lorc_rank:  # LoRC reads the same E4M3 activations (at decode: quantized once more for it)
            if xq is None:
                xq, t = self._quantize(x2, self.kp)
            y = (y.float() + ref8.lorc_term(xq, t, self.lorc_u, self.lorc_v)).to(x2.dtype)
        return y

    def _forward_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        from qconvert_kernels.fp8 import cuda as cuda_fp8

        xq, t = cuda_fp8.quantize_per_token_fp8(x2, self.kp)
        if self.layout == "fp4-fp8":
            y = cuda_fp8.fp4_fp8_gemm(xq, t, self.qweight, self.sexp, self.cscale, self.group_size, x2.dtype)
        else:
            y = cuda_fp8.fp8_fp8_gemm(xq, t, self.qweight, self.wscale, x2.dtype)
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
        if self._on_repacked(x2):
            return self._finish(self._forward_repacked(x2.contiguous()), x, shape)
        return self._finish(self._forward_cuda(x2) if x.is_cuda else self._forward_cpu(x2), x, shape)


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
