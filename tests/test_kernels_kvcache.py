"""The KV-cache write kernel (qconvert_kernels/kvcache) on the CPU: its thread-exact emulator
against the reference (two ``index_copy_``) bit for bit on odd shapes and layouts, deliberate
kernel bugs caught, and the decode engine writing its cache through it with unchanged logits.
tests/test_kernels_kvcache_gpu.py runs the kernel itself on a GPU."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from helpers import assert_wrong_arg_type_refused, mutation_tests
from qconvert_kernels.kvcache import cuda as kkv
from qconvert_kernels.kvcache import emulate
from qconvert_kernels.kvcache import reference as ref

DTYPES = (torch.float16, torch.bfloat16)


def kv_case(b: int, h: int, t: int, dk: int, dv: int, length: int, dtype, layout: str = "joined",
            cols=None, seed: int = 0):
    """k, v, cols and two caches as an attention layer and the engine hand them over.  ``layout``:
    "joined" (k and v views of one q/k/v projection [B, T, (Hq + 2 H) D], as a fused W4A8 GPU
    load gives them: Hq = 2 H), "rope" (k laid out [B, T, H, D] as the rope kernel writes it, v
    contiguous), "contiguous" ([B, H, T, D]).  Caches of random contents (what is not written must
    stay), one more row than used (the engine's ``[: rows]`` view).  ``cols``: the columns (default
    a prefill's 0 .. T - 1 shifted to end at L - 1)."""
    gen = torch.Generator().manual_seed(seed * 7919 + b * 131 + t * 17 + dk + 3 * dv)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if layout == "joined":
        assert dk == dv
        j = rnd(b, t, 4 * h * dk)
        k = j[..., 2 * h * dk: 3 * h * dk].view(b, t, h, dk).transpose(1, 2)
        v = j[..., 3 * h * dk:].view(b, t, h, dv).transpose(1, 2)
    elif layout == "rope":
        k, v = rnd(b, t, h, dk).transpose(1, 2), rnd(b, h, t, dv)
    else:
        k, v = rnd(b, h, t, dk), rnd(b, h, t, dv)
    kc_all, vc_all = rnd(b + 1, h, length, dk), rnd(b + 1, h, length, dv)
    if cols is None:
        cols = torch.arange(length - t, length)
    return k, v, torch.as_tensor(cols, dtype=torch.int64), kc_all[:b], vc_all[:b]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def run_kv(b=2, h=3, t=4, dk=24, dv=16, length=9, dtype=torch.float16, layout="rope", cols=None,
           mutations=frozenset()):
    k, v, cols, kc, vc = kv_case(b, h, t, dk, dv, length, dtype, layout, cols)
    want_k, want_v = kc.clone(), vc.clone()
    inside = (cols >= 0) & (cols < length)
    ref.kv_write(k[:, :, inside], v[:, :, inside], cols[inside], want_k, want_v)
    kc_base, vc_base = kc._base.clone(), vc._base.clone()  # the row past the view must stay
    with emulate.emulating(mutations=mutations) as emu:
        kkv.kv_write(k, v, cols, kc, vc)
    width, per_cta = kkv.heads_per_cta(max(dk, dv))
    assert emu.launches == [("kv_write", (t, -(-h // per_cta), b), (width, per_cta))]
    for got, want, base in ((kc, want_k, kc_base), (vc, want_v, vc_base)):
        assert torch.equal(bits(got), bits(want)), f"the cache differs in {(bits(got) != bits(want)).sum()} places"
        assert torch.equal(bits(got._base[b:]), bits(base[b:])), "the cache differs past the rows written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,t,dk,dv,length,layout", [
    (1, 1, 1, 1, 1, 2, "contiguous"), (1, 8, 1, 128, 128, 40, "joined"), (16, 8, 1, 128, 128, 7, "joined"),
    (2, 3, 4, 24, 16, 9, "rope"), (3, 5, 7, 130, 130, 11, "rope"), (1, 40, 3, 65, 96, 5, "contiguous"),
    (2, 2, 17, 6, 6, 17, "joined"),
])
def test_the_emulated_kernel_equals_the_reference(b, h, t, dk, dv, length, layout, dtype):
    """Odd shapes: one element; Llama-3-8B's decode token (8 KV heads of 128: 8 CTAs of one head)
    at batch 1 and 16; keys wider than values (a thread's value bound); heads of 130 (one a CTA);
    40 heads of 65 / 96 (one CTA of 96 threads a head); 21 heads of 6 per CTA with spare rows; a
    prefill filling every column; every layout."""
    run_kv(b, h, t, dk, dv, length, dtype, layout)


def test_a_decode_column_and_columns_out_of_order():
    run_kv(3, 2, 1, 8, 8, 6, cols=[3])
    run_kv(2, 3, 4, 8, 8, 6, cols=[5, 0, 2, 1])


def test_a_column_outside_the_cache_is_not_written():
    """The kernel's bound (memory safety; index_copy_ raises instead and the engine never gives one)."""
    run_kv(2, 3, 3, 8, 8, 5, cols=[1, 5, -1])


MUTATION_CASES = {  # mutation: what catches it ("differs": the caches; "error": the emulator's memory checks)
    "token_as_column": "differs",  # the default columns end at L - 1, not start at 0
    "v_with_k_strides": "error",  # rope layout: k's token stride (H D) walks v's [B, H, T, D] out of its view
    "value_bound_dk": "error",  # Dk 24 > Dv 16: reads past a value head
    "no_column_bound": "error",  # column 5 of 5: the last head of the last row writes past the cache view
    "spare_threads": "error",  # 3 heads of 24 in a CTA of 5 rows: the 4th reads past the last head
}


def run_mutant(mutations=frozenset()):
    run_kv(2, 3, 3, 24, 16, 5, layout="rope", cols=[1, 5, 2] if "no_column_bound" in mutations else None,
           mutations=mutations)


test_mutation_is_caught, test_every_mutation_has_a_test = mutation_tests(run_mutant, MUTATION_CASES,
                                                                         emulate.MUTATIONS)


def test_the_emulator_checks_what_the_kernel_touches(monkeypatch):
    """The launcher's and the emulator's checks, each made to fire: a cache overlapping a source
    (past the launcher's check), two tokens given one column, an expanded cache, two caches in one
    storage (the launcher's, then the emulator's), and an argument of the wrong type."""
    from qconvert_kernels import launch

    k, v, cols, kc, vc = kv_case(1, 2, 3, 8, 8, 5, torch.float16, "contiguous")
    with emulate.emulating(), pytest.raises(ValueError, match="shares memory"):
        kkv.kv_write(kc[:, :, :3], v, cols, kc, vc)  # keys read from the cache they go to
    with emulate.emulating(), pytest.raises(AssertionError, match="overlaps"):  # values written over the keys
        emulate.run("kv_write", (3, 1, 1), (8, 2), (launch.ptr(k), launch.ptr(v), launch.ptr(cols), launch.ptr(kc),
                    launch.ptr(k), *(np.int32(x) for x in (2, 8, 8)), np.int64(5),
                    *(np.int64(x) for x in (48, 24, 8, 48, 24, 8, 80, 40, 8, 48, 24, 8))))
    with emulate.emulating(), pytest.raises(AssertionError, match="more than once"):
        kkv.kv_write(k, v, torch.tensor([2, 2, 0]), kc, vc)
    with emulate.emulating(), pytest.raises(ValueError, match="k_cache .* has elements that share memory"):
        kkv.kv_write(k, v, cols, kc[:, :1].expand(1, 2, 5, 8), vc)  # both heads' rows in one
    both = torch.zeros(1, 2, 5, 12, dtype=torch.float16)
    kc2, vc2 = both[..., :8], both[..., 4:]
    with emulate.emulating(), pytest.raises(ValueError, match="k_cache and v_cache share memory"):
        kkv.kv_write(k, v, cols, kc2, vc2)
    with emulate.emulating(), pytest.raises(AssertionError, match="kc and vc share memory"):  # past the launcher
        emulate.run("kv_write", (3, 1, 1), (8, 2), (launch.ptr(k), launch.ptr(v), launch.ptr(cols),
                    launch.ptr(kc2), launch.ptr(vc2), *(np.int32(x) for x in (2, 8, 8)),
                    np.int64(5), *(np.int64(x) for x in (48, 24, 8, 48, 24, 8, 120, 60, 12, 120, 60, 12))))
    assert_wrong_arg_type_refused(monkeypatch, emulate.emulating, lambda: kkv.kv_write(k, v, cols, kc, vc))


def test_the_emulator_reads_the_kernels_own_argument_list():
    """emulate.PARAMS is kvcache.cu's KV_ARGS, name for name, and its types the declared ones."""
    from helpers import assert_kernel_args

    assert_kernel_args(kkv.SOURCE.read_text(), "KV_ARGS", emulate.PARAMS, emulate.PARAM_TYPES)


def test_bad_input_is_refused_with_the_fix():
    k, v, cols, kc, vc = kv_case(2, 3, 4, 8, 8, 6, torch.float16, "contiguous")
    with emulate.emulating():
        with pytest.raises(ValueError, match="k must be float16 or bfloat16"):
            kkv.kv_write(k.float(), v, cols, kc, vc)
        with pytest.raises(ValueError, match="v_cache must be torch.float16 like k"):
            kkv.kv_write(k, v, cols, kc, vc.bfloat16())
        with pytest.raises(ValueError, match="cols must be int64"):
            kkv.kv_write(k, v, cols.int(), kc, vc)
        with pytest.raises(ValueError, match="must match k's 2 rows"):
            kkv.kv_write(k, v[:, :2], cols, kc, vc)
        with pytest.raises(ValueError, match=r"must be \[2, 3, L, 8\]"):
            kkv.kv_write(k, v, cols, kc[:1], vc)
        with pytest.raises(ValueError, match="last dimension must be contiguous"):
            kkv.kv_write(k, v, cols, kc.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :6], vc)
    with pytest.raises(ValueError, match="CUDA"):
        kkv.kv_write(k, v, cols, kc, vc)  # CPU tensors outside the emulator


def test_the_engine_writes_its_cache_on_the_kernel(tiny_rtn_out):
    """The GPU path's decode (an is-w4a8 OUT set up as a GPU load sets it up: q/k/v joined, so k and
    v are views of one projection; the norms and RoPE on their kernels), every launch emulated: the
    logits of a left-padded prefill and three steps equal, bit for bit, those of the same engine
    writing with index_copy_; the cache launches are one a block a forward, and none is an
    index_copy_."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from helpers import w4a8_gpu_load_on_cpu
    from qconvert.engine import DecodeEngine
    from qconvert_kernels.norm import emulate as norm_emulate
    from qconvert_kernels.rope import emulate as rope_emulate
    from qconvert_kernels.w4a8 import emulate as w4a8_emulate

    ids = torch.randint(1, 300, (2, 5), generator=torch.Generator().manual_seed(6))
    runs, copies = [], collections.Counter()
    for kernel in (False, True):
        model = w4a8_gpu_load_on_cpu(tiny_rtn_out, ("norm", "rope"))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                copies[(kernel, func._schema.name)] += func._schema.name == "aten::index_copy_"
                return func(*args, **(kwargs or {}))

        with w4a8_emulate.emulating(sm_count=8), norm_emulate.emulating(), rope_emulate.emulating(), \
                emulate.emulating() as emu:
            eng = DecodeEngine(model, 2, 10, cache_kernel=kernel)
            assert eng.cache.kernel_device == (torch.device("cpu") if kernel else None)
            with Ops():
                logits = [eng.prefill(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))]
                for _ in range(3):
                    logits.append(eng.decode(logits[-1].argmax(-1)).clone())
        assert len(emu.launches) == (4 * model.config.num_hidden_layers if kernel else 0)
        runs.append(torch.stack(logits))
    assert copies[(False, "aten::index_copy_")] == 2 * 4 * model.config.num_hidden_layers
    assert copies[(True, "aten::index_copy_")] == 0
    assert torch.equal(bits(runs[1]), bits(runs[0]))


def test_the_engine_keeps_index_copy_off_the_gpu_and_for_other_dtypes(tiny_llama):
    """On the CPU the engine writes with index_copy_ (no kernel unless asked, and asking outside the
    emulator is refused with the fix); a float32 model on an engine asked for the kernel falls back
    to index_copy_, which the kernel does not take."""
    from transformers import AutoModelForCausalLM

    from qconvert.engine import DecodeEngine
    from qconvert.errors import QConvertError

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    assert DecodeEngine(model, 1, 8).cache.kernel_device is None
    with pytest.raises(QConvertError, match="cache_kernel=True: the KV-cache kernel runs on a CUDA device"):
        DecodeEngine(model, 1, 8, cache_kernel=True)  # the CPU outside the emulator: refused at once
    with emulate.emulating() as emu:
        eng = DecodeEngine(model, 1, 8, cache_kernel=True)
        eng.prefill(torch.tensor([[3, 4, 5]]))
        eng.decode(torch.tensor([7]))
    assert emu.launches == []


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_the_build_copies_each_value_once(arch):
    """The cubin the launcher loads (NVRTC, the launch options): per thread one 64-bit load of the
    column, two 16-bit loads and two 16-bit stores, the loads non-coherent (``__restrict__``), no
    float work and no integer division's reciprocal."""
    from helpers import kernel_ops
    from qconvert_kernels.kvcache import KVCACHE

    ops, count = kernel_ops(KVCACHE.path, arch)["kv_write"]
    assert (count["LDG"], count["STG"]) == (3, 2), (arch, dict(ops))
    # the sources read through the non-coherent path (their pointers const __restrict__)
    assert sum(n for op, n in ops.items() if op.startswith("LDG") and op.endswith(".CONSTANT")) == 3, (arch, dict(ops))
    assert not [op for op in ops if op.startswith(("F", "MUFU", "I2F", "F2I", "HADD", "HMUL"))], (arch, dict(ops))


def test_outputs_must_own_their_elements():
    """launch.check_writable, which the rope, swiglu and kvcache launchers run on their outputs:
    the views the engine and the models hand over pass (a cache's first rows, the halves of a joined
    output, a transposed projection, size-1 and zero-size dimensions); an expanded view, an
    overlapping one and two outputs in one storage are refused with the tensor's name."""
    from qconvert_kernels import launch

    cache, joined = torch.empty(4, 8, 16, 128), torch.empty(3, 2 * 96)
    launch.check_writable("f", rows=cache[:2], half=joined[:, :96], other=torch.empty(3, 96),
                          proj=torch.empty(2, 5, 4, 8).transpose(1, 2), one=torch.empty(1, 8).as_strided((1, 8), (77, 1)),
                          empty=torch.empty(1, 0).expand(4, 0))
    for bad in (torch.empty(1, 8).expand(3, 8), torch.empty(40).as_strided((4, 8), (4, 1))):
        with pytest.raises(ValueError, match="out .* has elements that share memory"):
            launch.check_writable("f", out=bad)
    with pytest.raises(ValueError, match="first and second share memory"):
        launch.check_writable("f", first=joined[:, :96], second=joined[:, 96:])
