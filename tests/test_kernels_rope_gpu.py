"""The rope kernel on a GPU against its reference, bit for bit, and a GPU load's attention layers
on it with the same logits as transformers' own RoPE (needs cupy and an sm_80+ GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert_kernels.w4a8 import cuda as kcuda  # noqa: E402
from qconvert_kernels.rope import cuda as kr  # noqa: E402
from qconvert_kernels.rope import reference as ref  # noqa: E402
from helpers import on_device  # noqa: E402
from test_kernels_rope import bits, rope_case  # noqa: E402

if not kcuda.available():
    pytest.skip("no CUDA device usable by cupy (sm_80+)", allow_module_level=True)

DEV = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hk,t,d,layout", [
    (1, 32, 8, 1, 128, "joined"), (16, 32, 8, 1, 128, "joined"), (1, 32, 8, 2048, 128, "joined"),
    (3, 5, 2, 7, 24, "split"), (2, 40, 40, 3, 130, "contiguous"), (2, 9, 3, 5, 64, "joined"),
])
def test_rope(b, hq, hk, t, d, layout, dtype):
    q, k, cos, sin = rope_case(b, hq, hk, t, d, dtype, layout)
    got_q, got_k = kr.rope(*(on_device(x, DEV) for x in (q, k, cos, sin)))  # views stay strided
    want_q, want_k = ref.rope(q, k, cos, sin)
    assert torch.equal(bits(got_q.cpu()), bits(want_q)) and torch.equal(bits(got_k.cpu()), bits(want_k))


def test_a_gpu_load_rotates_on_the_kernel(tiny_rtn_out, monkeypatch):
    from helpers import gpu_load_kernel_calls

    layers, calls, got, want = gpu_load_kernel_calls(tiny_rtn_out, monkeypatch, kr, "rope", "LlamaAttention",
                                                     "rope_kernel_device", "rope_kernels")
    assert len(calls) == len(layers)  # every layer on the kernel
    assert torch.equal(bits(got), bits(want))  # transformers' RoPE, bit for bit
