"""The RMSNorm kernel (qconvert_kernels/norm) on the CPU: its lane-exact emulator against the
reference bit for bit on odd shapes, deliberate kernel bugs caught, the reference against
transformers' own RMSNorm, and a model whose norms run the kernel (``qconvert.norms``).
tests/test_kernels_norm_gpu.py runs the kernel itself on a GPU."""

from __future__ import annotations

import inspect

import pytest
import torch

from helpers import assert_mutation_caught
from qconvert.norms import NORM_CLASSES, use_norm_kernels
from qconvert_kernels.norm import cuda as kn
from qconvert_kernels.norm import emulate
from qconvert_kernels.norm import reference as ref

DTYPES = (torch.float16, torch.bfloat16)


def norm_case(rows: int, n: int, dtype, seed: int = 0):
    """Rows of mixed magnitudes: normal values, one row of zeros (r = 1 / sqrt(eps)), one near the
    dtype's largest values, one of fp16 subnormals, where there are rows enough."""
    gen = torch.Generator().manual_seed(seed * 7919 + n + rows)
    x = torch.randn(rows, n, generator=gen) * 3
    if rows > 1:
        x[1] = 0
    if rows > 2:  # squares up to 4e9 (fp16) or 1e30 (bf16): large, and their sums finite in float32
        x[2] = (torch.rand(n, generator=gen) * 2 - 1) * (6e4 if dtype == torch.float16 else 1e15)
    if rows > 3:
        x[3] = torch.randn(n, generator=gen) * 1e-6
    w = torch.rand(n, generator=gen) * 2 - 0.5
    return x.to(dtype), w.to(dtype)


def run_norm(rows=5, n=576, dtype=torch.float16, eps=1e-5, mutations=frozenset()):
    x, w = norm_case(rows, n, dtype)
    with emulate.emulating(mutations=mutations) as emu:
        y = kn.rms_norm(x, w, eps)
    assert [name for name, _ in emu.launches] == [f"rms_norm_{'f16' if dtype == torch.float16 else 'bf16'}"]
    want = ref.rms_norm(x, w, eps)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"y differs in {(y.view(torch.int16) != want.view(torch.int16)).sum()} places"
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (5, 255), (4, 257), (5, 576), (2, 1000), (17, 96), (1, 4099)])
def test_the_emulated_kernel_equals_the_reference(rows, n, dtype):
    run_norm(rows, n, dtype)


def test_eps_and_leading_dimensions():
    x, w = norm_case(6, 64, torch.float16)
    x = x.reshape(2, 3, 64)
    with emulate.emulating():
        y = kn.rms_norm(x, w, 1e-6)
    assert y.shape == (2, 3, 64) and torch.equal(y, ref.rms_norm(x, w, 1e-6))
    assert not torch.equal(y[1, 0], ref.rms_norm(x, w, 1e-2)[1, 0])  # the 1e-6 row: eps matters
    with emulate.emulating(), pytest.raises(ValueError, match="the kernel takes 1 to"):
        kn.rms_norm(x[..., :0], w[:0], 1e-6)


MUTATION_CASES = {
    "warp0_only": (run_norm, ()),
    "no_eps": (run_norm, ()),
    "h_unrounded": (run_norm, ()),
    "stride_warp": (run_norm, ()),
}


@pytest.mark.parametrize("mutation", sorted(MUTATION_CASES))
def test_mutation_is_caught(mutation):
    runner, args = MUTATION_CASES[mutation]
    assert_mutation_caught(runner, args, mutation, "differs", AssertionError)


def test_every_mutation_has_a_test():
    assert set(MUTATION_CASES) == set(emulate.MUTATIONS)


def test_bad_input_is_refused_with_the_fix():
    x, w = norm_case(2, 8, torch.float16)
    with emulate.emulating():
        with pytest.raises(ValueError, match="x must be float16 or bfloat16"):
            kn.rms_norm(x.float(), w, 1e-5)
        with pytest.raises(ValueError, match="weight must be torch.float16 like x"):
            kn.rms_norm(x, w.bfloat16(), 1e-5)
        with pytest.raises(ValueError, match=r"weight must be \[8\]"):
            kn.rms_norm(x, w[:4], 1e-5)
    with pytest.raises(ValueError, match="CUDA"):
        kn.rms_norm(x, w, 1e-5)  # CPU tensors outside the emulator


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_reference_is_transformers_rmsnorm_to_an_ulp(dtype):
    """transformers' LlamaRMSNorm (mean in its own order, rsqrt) against the kernel's definition:
    equal but for a few outputs a unit in the last place apart."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w = norm_case(64, 576, dtype, seed=3)
    x[1:4] = (torch.randn(3, 576, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        hf = norm(x)
    got = ref.rms_norm(x, w, 1e-5)
    bits, want = got.view(torch.int16).int(), hf.view(torch.int16).int()
    apart = (bits - want).abs()
    assert apart.max() <= 1, apart.max()
    assert (apart > 0).sum() <= x.numel() // 1000, (apart > 0).sum()


@pytest.mark.parametrize("name", NORM_CLASSES)
def test_the_norm_classes_compute_the_llama_formula(name):
    """Each class the kernel stands in for has LlamaRMSNorm's forward in the installed transformers."""
    import importlib

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = {"Qwen3MoeRMSNorm": "qwen3_moe"}.get(name, name.removesuffix("RMSNorm").lower())
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
    assert inspect.getsource(cls.forward) == inspect.getsource(LlamaRMSNorm.forward)


def test_a_model_runs_its_norms_on_the_kernel(tiny_llama):
    """A Llama's RMSNorms on the kernel (emulated): two launches a block and the final norm, the
    logits those of transformers' norms to float16 rounding; a second call sets nothing new; a
    grad-enabled call, another dtype or another device keep transformers' forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).eval()
    ids = torch.tensor([[3, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        want = model(ids).logits.float()
    layers = model.config.num_hidden_layers
    assert use_norm_kernels(model, "cpu") == 2 * layers + 1
    assert use_norm_kernels(model, "cpu") == 0
    with torch.no_grad(), emulate.emulating() as emu:
        got = model(ids).logits.float()
    assert len(emu.launches) == 2 * layers + 1
    assert (got - want).abs().max() <= 0.05 * want.abs().max(), (got - want).abs().max()
    import copy
    import pickle

    norm = model.model.norm
    h = torch.randn(2, model.config.hidden_size).half()
    again = pickle.loads(pickle.dumps(norm))  # (torch.save pickles): the copy's forward is its own
    again.weight.data.mul_(2)
    with torch.no_grad(), emulate.emulating():
        assert torch.equal(again(h), kn.rms_norm(h, again.weight, norm.variance_epsilon))
        assert torch.equal(copy.deepcopy(norm)(h), norm(h))
    with emulate.emulating() as emu:
        with torch.enable_grad():  # (the suite runs without grad: conftest)
            model(ids)  # grad enabled: the kernel has no backward
        assert norm(h.float()).dtype == torch.float32  # float32 input: not a kernel dtype
    assert emu.launches == []
    use_norm_kernels(model, "meta")
    with torch.no_grad():
        assert torch.equal(model(ids).logits.float(), want)  # inputs on the CPU: transformers' norms


def test_a_w4a8_decode_step_on_its_kernels_and_the_norm_kernel_reads_nothing_back(tiny_rtn_out):
    """The GPU path's decode step (an is-w4a8 OUT set up as a GPU load sets it up: siblings joined,
    the kernels' copies prepared, the norms on their kernel), every launch emulated: no op reads a
    value back to the host (what a CUDA graph could not capture), the norms and the W4A8 GEMMs are
    launched, and the logits equal those of the same steps with transformers' norms to fp16 rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qconvert import load
    from qconvert.engine import DecodeEngine
    from qconvert.layouts.int4 import W4A8Linear
    from qconvert.runtime import fuse_siblings
    from qconvert_kernels.w4a8 import emulate as w4a8_emulate

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"):
                self.seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    ids = torch.randint(1, 300, (2, 5), generator=torch.Generator().manual_seed(5))
    steps = []
    for norms in (False, True):
        model = load(tiny_rtn_out, dtype=torch.float16)
        fuse_siblings(model)
        for m in model.modules():
            if isinstance(m, W4A8Linear):
                m.prepare_cuda(torch.device("cpu"))
        if norms:
            use_norm_kernels(model, "cpu")
        with w4a8_emulate.emulating(sm_count=8) as w4, emulate.emulating() as nemu:
            eng = DecodeEngine(model, 2, 10)
            logits = [eng.prefill(ids)]
            reads = Reads()
            for _ in range(2):
                with reads:
                    logits.append(eng.decode(logits[-1].argmax(-1)))
        assert reads.seen == []
        assert w4.launches and (len(nemu.launches) > 0) == norms
        steps.append(torch.stack(logits).float())
    assert (steps[1] - steps[0]).abs().max() <= 0.05 * steps[0].abs().max()
