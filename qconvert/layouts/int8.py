"""Layout ``w8a8``: int8 weights per output channel, dynamic per-token int8 activations.

Stored (docs/format.md):

    qweight  int8 [N, K]     q in [-127, 127], symmetric, per output channel
    wscale   float32 [N]     W[n, k] ~= q[n, k] · s[n]
    shape    int64 [2]       the true [N, K]

Computing, with activations x [M, K]: xq, t = the per-token int8 quantizer of the W4A8 layouts
(qconvert_kernels/w4a8/reference.py, |xq| <= 127); A[m, n] = Σ_k xq[m, k] · q[n, k] in int32 (exact:
|A| <= 127² K < 2^31 for K < 133,000); y[m, n] = float32(A[m, n]) · (t[m] · s[n]).  On CUDA the
int32 product runs on cuBLASLt's int8 GEMM (``torch._int_mm``).

This is the scheme serving engines run most widely on int8 hardware: it exports to
compressed-tensors' ``int-quantized`` W8A8 (channel weights, dynamic per-token symmetric
activations), which vLLM serves on GPUs and on CPUs (oneDNN).
"""

from __future__ import annotations

import torch

from qconvert.errors import NoKernel
from qconvert.layouts.base import Layout, QuantizedModule, TensorSpec, finite_positive, shape_check
from qconvert_kernels.w4a8 import reference as ref

INT8_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
_INT_MM_MIN_ROWS = 17  # torch._int_mm takes M > 16


def int8_gemm(xq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A = xq qᵀ as int32 [M, N], exactly: cuBLASLt's int8 GEMM on CUDA; on CPU a float64
    product (every partial sum is an integer below 2^53)."""
    if xq.is_cuda:
        m = xq.shape[0]
        if m < _INT_MM_MIN_ROWS:
            xq = torch.nn.functional.pad(xq, (0, 0, 0, _INT_MM_MIN_ROWS - m))
        return torch._int_mm(xq, q.t())[:m]
    return (xq.double() @ q.double().t()).to(torch.int32)


class W8A8Linear(QuantizedModule):
    """int8 x int8 -> int32, one float conversion per output (see the module docstring)."""

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.layout = "w8a8"
        self.out_features, self.in_features = (int(v) for v in tensors["shape"])
        self.register_buffer("qweight", tensors["qweight"])
        self.register_buffer("wscale", tensors["wscale"])
        self._bias(bias)

    def extra_repr(self):
        return f"w8a8, in_features={self.in_features}, out_features={self.out_features}"

    def check_cuda(self, name: str) -> None:
        if self.in_features % 8 or self.out_features % 8:
            raise NoKernel(f"{name}: the int8 GEMM needs N and K multiples of 8, got N={self.out_features}, "
                                f"K={self.in_features}; this OUT runs on CPU only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, t = ref.quantize_per_token_int8(x.reshape(-1, shape[-1]))
        acc = int8_gemm(xq, self.qweight)
        y = acc.float() * (t.float()[:, None] * self.wscale.float()[None, :])
        return self._finish(y, x, shape)


class W8A8Layout(Layout):
    """w8a8: see the module docstring."""

    export_note = "W8A8 (int-quantized)"

    def spec(self, n: int, k: int) -> dict[str, TensorSpec]:
        return {"qweight": TensorSpec(torch.int8, (n, k), "int8 weights, symmetric per output channel"),
                "shape": TensorSpec(torch.int64, (2,), "the true [N, K]"),
                "wscale": TensorSpec(torch.float32, (n,), "weight scale per output channel")}

    def check(self, name, tensors, n, k) -> list[str]:
        problems = shape_check(name, tensors, n, k) + finite_positive(name, tensors["wscale"], "wscale")
        if bool((tensors["qweight"] == -128).any()):
            problems.append(f"{name}.qweight holds -128 (the symmetric grid is [-127, 127])")
        return problems

    def module(self, tensors, bias) -> W8A8Linear:
        return W8A8Linear(tensors, bias)

    def export_scheme(self, n, k) -> dict:
        return {"format": "int-quantized", "preset": "W8A8",
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
                "input_activations": dict(INT8_ACTIVATIONS)}

    def export_tensors(self, tensors, n, k, scale_dtype):
        """weight int8 [N, K] (as stored), weight_scale [N, 1] in ``scale_dtype``."""
        exact = tensors["wscale"].double()
        stored = exact.to(scale_dtype)
        rel = float(((stored.double() - exact).abs() / exact).max()) if exact.numel() else 0.0
        return {"weight": tensors["qweight"].contiguous(), "weight_scale": stored[:, None].contiguous()}, rel

    def card_rows(self, config: dict) -> list[tuple[str, str]]:
        return [("weights", "int8, symmetric, per output channel, float32 scales"),
                ("activations", "int8, dynamic, per-token, symmetric, quantized as the model runs")]

    def tags(self, config: dict) -> list[str]:
        return ["int8", "w8a8", "int8-activations"]

    def random_tensors(self, n, k, gen, device) -> dict[str, torch.Tensor]:
        return {"qweight": torch.randint(-127, 128, (n, k), generator=gen, device=device, dtype=torch.int8),
                "shape": torch.tensor([n, k], dtype=torch.int64),
                "wscale": torch.rand(n, generator=gen, device=device) * 0.001 + 1e-4}


W8A8 = W8A8Layout("w8a8", "int8 weights per output channel, dynamic per-token int8 activations")
