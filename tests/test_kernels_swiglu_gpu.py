"""The SwiGLU kernel on a GPU against torch's own silu(gate) * up, bit for bit (the two share CUDA's
expf), and a GPU load's MLPs on it with the same logits as with transformers' two ops (needs cupy
and an sm_80+ GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert_kernels.swiglu import cuda as ks  # noqa: E402
from qconvert_kernels.w4a8 import cuda as kcuda  # noqa: E402
from helpers import on_device  # noqa: E402
from test_kernels_swiglu import bits, swiglu_case  # noqa: E402

if not kcuda.available():
    pytest.skip("no CUDA device usable by cupy (sm_80+)", allow_module_level=True)

DEV = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", [
    ((1, 14336), "joined"), ((16, 14336), "joined"), ((2048, 14336), "joined"), ((3, 300), "joined"),
    ((2, 5, 257), "contiguous"), ((17, 1536), "contiguous"), ((64, 4096), "contiguous"),
])
def test_swiglu_equals_torch(shape, layout, dtype):
    gate, up = (on_device(t, DEV) for t in swiglu_case(shape, dtype, layout))  # joined halves stay strided
    got = ks.swiglu(gate, up)
    want = torch.nn.functional.silu(gate) * up
    assert torch.equal(bits(got), bits(want)), f"{int((bits(got) != bits(want)).sum())} of {got.numel()} differ"


def test_a_gpu_load_runs_its_mlps_on_the_kernel(tiny_rtn_out, monkeypatch):
    from helpers import gpu_load_kernel_calls

    mlps, calls, got, want = gpu_load_kernel_calls(tiny_rtn_out, monkeypatch, ks, "swiglu", "LlamaMLP",
                                                   "swiglu_kernel_device", "swiglu_kernels")
    assert len(calls) == len(mlps)  # every MLP on the kernel
    assert torch.equal(bits(got), bits(want))  # torch's silu and product, bit for bit


def test_a_phi3_on_the_gpu_keeps_its_logits_bit_for_bit(tmp_path):
    """A tiny Phi-3 in float16 on the GPU: with its joined MLPs on the kernel (the halves of
    gate_up_proj's output read in place) the logits are transformers' own, bit for bit."""
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config, write_model
    from qconvert.mlp import use_swiglu_kernels

    src = write_model(tmp_path / "phi3", tiny_config("phi3", hidden=256, intermediate=704))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).to(DEV).eval()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.no_grad():
        want = model(ids).logits
        assert use_swiglu_kernels(model, DEV) == model.config.num_hidden_layers
        got = model(ids).logits
    assert torch.equal(bits(got), bits(want))
