"""The rope kernel (qconvert_kernels/rope) on the CPU: its thread-exact emulator against the
reference bit for bit on odd shapes and layouts, deliberate kernel bugs caught, the reference
against transformers' own ``apply_rotary_pos_emb`` (bit for bit), and models whose attention
layers rotate on the kernel (``qconvert.rope``) with unchanged logits.
tests/test_kernels_rope_gpu.py runs the kernel itself on a GPU."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch

from helpers import assert_wrong_arg_type_refused, mutation_tests
from qconvert.rope import ATTENTION_CLASSES, MODELING, RopeDispatch, use_rope_kernels
from qconvert_kernels.rope import cuda as kr
from qconvert_kernels.rope import emulate
from qconvert_kernels.rope import reference as ref

DTYPES = (torch.float16, torch.bfloat16)


def rope_case(b: int, hq: int, hk: int, t: int, d: int, dtype, layout: str = "joined", seed: int = 0,
              shared_table: bool = False):
    """q, k, cos, sin as an attention layer hands them over.  ``layout``: "joined" (q and k views
    of one q/k/v projection [B, T, (Hq + 2 Hk) D], as a fused W4A8 GPU load gives them), "split"
    (each its own projection [B, T, H, D], transposed), "contiguous" ([B, H, T, D] tensors).
    Tables of random angles whose halves differ (Llama's are equal; the kernel must not rely on
    it), one row per batch row (left padding gives rows different positions) or ``shared_table``
    (one row broadcast, stride 0).  Values over many magnitudes, some subnormal in fp16."""
    gen = torch.Generator().manual_seed(seed * 7919 + b * 131 + t * 17 + d)
    scale = 10.0 ** torch.randint(-6, 4, (b, t, 1, 1), generator=gen).float()
    if layout == "joined":
        j = (torch.randn(b, t, (hq + 2 * hk) * d, generator=gen) * scale.reshape(b, t, 1)).to(dtype)
        q = j[..., : hq * d].view(b, t, hq, d).transpose(1, 2)
        k = j[..., hq * d: (hq + hk) * d].view(b, t, hk, d).transpose(1, 2)
    elif layout == "split":
        q = (torch.randn(b, t, hq, d, generator=gen) * scale).to(dtype).transpose(1, 2)
        k = (torch.randn(b, t, hk, d, generator=gen) * scale).to(dtype).transpose(1, 2)
    else:
        q = (torch.randn(b, hq, t, d, generator=gen) * 3).to(dtype)
        k = (torch.randn(b, hk, t, d, generator=gen) * 3).to(dtype)
    angle = torch.rand(1 if shared_table else b, t, d, generator=gen) * 200
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    if shared_table:
        cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)
    return q, k, cos, sin


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def run_rope(b=3, hq=5, hk=2, t=7, d=24, dtype=torch.float16, layout="split", shared_table=False,
             mutations=frozenset()):
    q, k, cos, sin = rope_case(b, hq, hk, t, d, dtype, layout, shared_table=shared_table)
    with emulate.emulating(mutations=mutations) as emu:
        qo, ko = kr.rope(q, k, cos, sin)
    half, per_cta = kr.heads_per_cta(d // 2)
    assert emu.launches == [(f"rope_{'f16' if dtype == torch.float16 else 'bf16'}", (t, -(-(hq + hk) // per_cta), b),
                             (half, per_cta))]
    want_q, want_k = ref.rope(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    for got, want in ((qo, want_q), (ko, want_k)):
        assert torch.equal(bits(got), bits(want)), f"the output differs in {(bits(got) != bits(want)).sum()} places"
    return qo, ko


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hq,hk,t,d,layout", [
    (1, 1, 1, 1, 2, "joined"), (1, 32, 8, 1, 128, "joined"), (3, 5, 2, 7, 24, "split"), (2, 9, 3, 5, 64, "joined"),
    (4, 3, 3, 2, 96, "contiguous"), (1, 40, 40, 3, 130, "split"), (2, 1, 1, 17, 6, "contiguous"),
])
def test_the_emulated_kernel_equals_the_reference(b, hq, hk, t, d, layout, dtype):
    """Odd shapes: one pair; Llama-3-8B's decode token (40 heads of 64 pairs: 20 CTAs of 2 heads);
    heads of 65 pairs (one a CTA, 80 CTAs a token); 7 heads of 12 pairs in one CTA of 10 (spare
    head rows); GQA and MHA; every input layout."""
    run_rope(b, hq, hk, t, d, dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_table_broadcast_over_the_batch(dtype):
    run_rope(3, 4, 2, 5, 16, dtype, "joined", shared_table=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["joined", "split", "contiguous"])
def test_the_reference_is_transformers_rope_bit_for_bit(dtype, layout):
    """transformers' apply_rotary_pos_emb (q * cos + rotate_half(q) * sin) equals the kernel's
    definition exactly, on values from subnormal to large, with Llama's own tables too."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    q, k, cos, sin = rope_case(3, 6, 2, 9, 64, dtype, layout, seed=4)
    cfg = LlamaConfig(hidden_size=384, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 1, 2, 3, 4, 5], [9, 70, 500, 900, 1000, 2047, 3000, 4000, 4095]])
    llama_cos, llama_sin = LlamaRotaryEmbedding(cfg)(q, positions)
    for c, s in ((cos, sin), (llama_cos.to(dtype), llama_sin.to(dtype))):
        want_q, want_k = apply_rotary_pos_emb(q, k, c, s)
        got_q, got_k = ref.rope(q, k, c, s)
        assert torch.equal(bits(got_q), bits(want_q)) and torch.equal(bits(got_k), bits(want_k))


MUTATION_CASES = {  # mutation: what catches it ("differs": the outputs; "error": the emulator's memory checks)
    "sin_sign": "differs",
    "same_half_table": "differs",  # the test tables' halves differ
    "unrounded_products": "differs",
    "k_with_q_strides": "error",  # split layout: k's strides (2 heads) are not q's (5): reads outside k
    "table_batch_shared": "differs",  # one table row a batch row
    "spare_threads": "error",  # 7 heads in a CTA of 10 head rows: the 8th reads past k's last head
}


test_mutation_is_caught, test_every_mutation_has_a_test = mutation_tests(run_rope, MUTATION_CASES,
                                                                         emulate.MUTATIONS)


def test_the_emulator_checks_what_the_kernel_touches(monkeypatch):
    """The emulator's own checks, each made to fire: an output overlapping an input (past the
    launcher's check), output views that a launch would write twice, and an argument of the wrong
    type (an int32 where the kernel reads a long long would shift the arguments after it)."""
    import numpy as np

    from qconvert_kernels import launch

    q, k, cos, sin = rope_case(1, 2, 1, 3, 8, torch.float16, "contiguous")
    with emulate.emulating(), pytest.raises(ValueError, match="shares memory with an input"):
        kr.rope(q, k, cos, sin, out=(q, torch.empty_like(k)))
    ko = torch.empty_like(k)
    with emulate.emulating(), pytest.raises(AssertionError, match="overlaps"):  # a launch writing q in place
        emulate.run("rope_f16", (3, 1, 1), (4, 3), (launch.ptr(q), launch.ptr(k), launch.ptr(cos), launch.ptr(sin),
                    launch.ptr(q), launch.ptr(ko), *(np.int32(v) for v in (2, 1, 4)),
                    *(np.int64(v) for v in (48, 24, 8, 24, 24, 8, 48, 24, 8, 24, 24, 8, 24, 8, 24, 8))))
    twice = torch.empty(1, 2, 1, 8, dtype=torch.float16).expand(1, 2, 3, 8)  # three tokens on one row
    with emulate.emulating(), pytest.raises(ValueError, match=r"out\[0\] .* has elements that share memory"):
        kr.rope(q, k, cos, sin, out=(twice, torch.empty_like(k)))
    with emulate.emulating(), pytest.raises(AssertionError, match="written"):  # past the launcher's check
        emulate.run("rope_f16", (3, 1, 1), (4, 3), (launch.ptr(q), launch.ptr(k), launch.ptr(cos), launch.ptr(sin),
                    launch.ptr(twice), launch.ptr(ko), *(np.int32(v) for v in (2, 1, 4)),
                    *(np.int64(v) for v in (48, 24, 8, 24, 24, 8, 16, 8, 0, 24, 24, 8, 24, 8, 24, 8))))
    assert_wrong_arg_type_refused(monkeypatch, emulate.emulating, lambda: kr.rope(q, k, cos, sin))


def test_the_emulator_reads_the_kernels_own_argument_list():
    """emulate.PARAMS is rope.cu's QR_ARGS, name for name, and its types the declared ones."""
    from helpers import assert_kernel_args

    assert_kernel_args(kr.SOURCE.read_text(), "QR_ARGS", emulate.PARAMS, emulate.PARAM_TYPES)


def test_bad_input_is_refused_with_the_fix():
    q, k, cos, sin = rope_case(2, 4, 2, 3, 8, torch.float16)
    with emulate.emulating():
        with pytest.raises(ValueError, match="q must be float16 or bfloat16"):
            kr.rope(q.float(), k, cos, sin)
        with pytest.raises(ValueError, match="sin must be torch.float16 like q"):
            kr.rope(q, k, cos, sin.bfloat16())
        with pytest.raises(ValueError, match="must share q's batch"):
            kr.rope(q, k[:1], cos, sin)
        with pytest.raises(ValueError, match="head size must be even .* got 7"):
            kr.rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
        with pytest.raises(ValueError, match=r"cos must be \[2 or 1, 3, 8\]"):
            kr.rope(q, k, cos[:, :2], sin)
    with pytest.raises(ValueError, match="CUDA"):
        kr.rope(q, k, cos, sin)  # CPU tensors outside the emulator


def _modeling(name: str):
    module = {"Qwen3MoeAttention": "qwen3_moe"}.get(name, name.removesuffix("Attention").lower())
    return importlib.import_module(f"transformers.models.{module}.modeling_{module}")


@pytest.mark.parametrize("name", ATTENTION_CLASSES)
def test_the_attention_classes_rotate_with_the_llama_formula(name):
    """Each class the kernel stands in for calls its module's apply_rotary_pos_emb(q, k, cos, sin)
    in its forward, and that function is Llama's, word for word, in the installed transformers."""
    modeling, llama = _modeling(name), _modeling("LlamaAttention")

    def body(mod) -> str:  # the function's text (hub-kernel decorators make it an object getsource refuses)
        text = inspect.getsource(mod)
        return re.search(r"^def apply_rotary_pos_emb\(.*?^    return q_embed, k_embed$", text, re.S | re.M).group(0)

    assert body(modeling) == body(llama)
    forward = inspect.getsource(getattr(modeling, name).forward)
    assert "apply_rotary_pos_emb(query_states, key_states, cos, sin)" in forward
    assert inspect.getsource(modeling.rotate_half) == inspect.getsource(llama.rotate_half)  # which the function calls
    assert getattr(modeling, name).__module__ == MODELING[name]


def test_a_model_rotates_on_the_kernel_with_the_same_logits(tiny_llama):
    """A Llama's attention layers on the kernel (emulated): one launch a block, the logits those of
    transformers' own RoPE bit for bit, prefill and a cached step; a second call sets nothing new;
    grad, another dtype, another device, or a call from outside the layer keep transformers'."""
    import copy
    import pickle

    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).eval()
    ids = torch.tensor([[3, 17, 42, 99, 7, 250], [5, 6, 7, 8, 9, 10]])

    from qconvert.engine import keyword_of

    name = keyword_of(model.forward, "cache", "past_key_values")  # transformers 5.25: cache

    def run():
        cache = DynamicCache(config=model.config)
        first = model(ids, **{name: cache}, use_cache=True).logits
        step = model(ids[:, :1], **{name: cache}, use_cache=True).logits
        return first, step

    with torch.no_grad():
        want = run()
        want_full = model(ids).logits
    layers = model.config.num_hidden_layers
    assert use_rope_kernels(model, "cpu") == layers
    assert use_rope_kernels(model, "cpu") == 0
    with torch.no_grad(), emulate.emulating() as emu:
        got = run()
    assert len(emu.launches) == 2 * layers
    for g, w in zip(got, want):
        assert torch.equal(bits(g), bits(w))
    again = pickle.loads(pickle.dumps(model))  # (torch.save pickles): the copy's layers are its own
    assert again.model.layers[0].self_attn.forward.args[0] is again.model.layers[0].self_attn
    attn = model.model.layers[0].self_attn
    assert copy.deepcopy(attn).forward.args[0] is not attn
    with torch.no_grad(), emulate.emulating() as emu:
        assert torch.equal(bits(again(ids).logits), bits(want_full))
    assert len(emu.launches) == layers
    from transformers.models.llama import modeling_llama

    dispatch = modeling_llama.apply_rotary_pos_emb
    assert isinstance(dispatch, RopeDispatch)
    assert copy.copy(dispatch) is dispatch and copy.deepcopy(dispatch) is dispatch
    assert pickle.loads(pickle.dumps(dispatch)) is dispatch  # named by its module
    q, k, cos, sin = rope_case(1, 2, 1, 3, 8, torch.float16)
    with emulate.emulating() as emu:
        with torch.enable_grad():  # (the suite runs without grad: conftest)
            model(ids)  # grad enabled: the kernel has no backward
        modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)  # not inside an opted-in layer
    assert emu.launches == []
    use_rope_kernels(model, "meta")
    with torch.no_grad():
        assert all(torch.equal(g, w) for g, w in zip(run(), want))  # inputs on the CPU: transformers' RoPE
    use_rope_kernels(model, "cpu")
    from qconvert.rope import _kernel_takes

    cpu = torch.device("cpu")
    wide = rope_case(1, 1, 1, 2, 2050, torch.float16)  # D beyond the kernel's 2048: transformers' function
    assert _kernel_takes(*rope_case(1, 1, 1, 2, 2048, torch.float16), cpu) and not _kernel_takes(*wide, cpu)
    q, k, cos, sin = rope_case(2, 2, 1, 3, 8, torch.float16)
    for args in ((q.float(), k, cos, sin), (q, k, cos.float(), sin), (q, k[:1], cos, sin), (q, k, cos[:, :2], sin),
                 (q[0], k[0], cos, sin)):
        assert not _kernel_takes(*args, cpu)
    with torch.enable_grad():
        assert not _kernel_takes(q, k, cos, sin, cpu)


def test_only_transformers_own_classes_are_set(tiny_llama):
    """A class named like a known one but defined elsewhere (remote code, which may rotate
    otherwise) keeps its forward, and its module's function is not replaced."""
    import types

    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).eval()
    elsewhere = types.ModuleType("remote_llama")
    elsewhere.apply_rotary_pos_emb = lambda *a: None
    cls = type("LlamaAttention", (LlamaAttention,), {"__module__": "remote_llama"})
    import sys

    sys.modules["remote_llama"] = elsewhere
    try:
        for layer in model.model.layers:
            layer.self_attn.__class__ = cls
        assert use_rope_kernels(model, "cpu") == 0
        assert not isinstance(elsewhere.apply_rotary_pos_emb, RopeDispatch)
    finally:
        del sys.modules["remote_llama"]


def test_a_w4a8_decode_step_on_its_kernels_rotates_on_the_rope_kernel(tiny_rtn_out):
    """The GPU path's decode step (an is-w4a8 OUT set up as a GPU load sets it up: q/k/v joined, so
    q and k are views of one projection, the norms and RoPE on their kernels), every launch
    emulated: the logits of prefill and two steps on the DecodeEngine equal, bit for bit, those of
    the same model with transformers' RoPE, the RoPE launches are one a block a forward, and no op
    of a step reads a value back to the host (what a CUDA graph could not capture)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from helpers import w4a8_gpu_load_on_cpu
    from qconvert.engine import DecodeEngine
    from qconvert_kernels.norm import emulate as norm_emulate
    from qconvert_kernels.w4a8 import emulate as w4a8_emulate

    ids = torch.randint(1, 300, (2, 5), generator=torch.Generator().manual_seed(5))
    runs = []
    for rope in (False, True):
        model = w4a8_gpu_load_on_cpu(tiny_rtn_out, ("norm", "rope") if rope else ("norm",))
        reads = []

        class Reads(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._schema.name in ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"):
                    reads.append(func._schema.name)
                return func(*args, **(kwargs or {}))

        with w4a8_emulate.emulating(sm_count=8), norm_emulate.emulating(), emulate.emulating() as remu:
            eng = DecodeEngine(model, 2, 10)
            logits = [eng.prefill(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))]
            for _ in range(2):
                nxt = logits[-1].argmax(-1)
                with Reads():
                    logits.append(eng.decode(nxt).clone())
        assert reads == []
        assert len(remu.launches) == (3 * model.config.num_hidden_layers if rope else 0)
        runs.append(torch.stack(logits))
    assert torch.equal(bits(runs[1]), bits(runs[0]))


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_the_build_reads_each_value_once_and_fuses_no_product(arch):
    """The cubins the launcher loads (NVRTC, the launch options): per thread six 16-bit loads (two
    inputs, four table values), two stores, four products and two sums, none of them an FFMA (an
    FMA would skip the products' rounding to the dtype), no integer division's reciprocal."""
    from helpers import kernel_ops
    from qconvert_kernels.rope import ROPE

    built = kernel_ops(ROPE.path, arch)
    for name in ROPE.kernels:
        ops, count = built[name]
        assert (count["LDG"], count["STG"], count["FMUL"], count["FADD"]) == (6, 2, 4, 2), (arch, name, dict(ops))
        assert count["FFMA"] == count["MUFU"] == count["I2F"] == 0, (arch, name, dict(ops))
