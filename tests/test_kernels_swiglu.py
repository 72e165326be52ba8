"""The SwiGLU kernel (qconvert_kernels/swiglu) on the CPU: its thread-exact emulator against the
reference bit for bit on odd shapes and layouts, deliberate kernel bugs caught, the reference
against torch's own ``silu(gate) * up`` (equal but for the exp stand-in: measured), and models
whose MLPs run on the kernel (``qconvert.mlp``).  tests/test_kernels_swiglu_gpu.py runs the
kernel itself on a GPU, bit for bit against torch."""

from __future__ import annotations

import collections
import importlib
import inspect

import numpy as np
import pytest
import torch

from helpers import assert_wrong_arg_type_refused, mutation_tests
from qconvert.mlp import JOINED_MLP_CLASSES, MLP_CLASSES, MODELING, use_swiglu_kernels
from qconvert_kernels.swiglu import cuda as ks
from qconvert_kernels.swiglu import emulate
from qconvert_kernels.swiglu import reference as ref

DTYPES = (torch.float16, torch.bfloat16)


def swiglu_case(shape: tuple, dtype, layout: str = "joined", seed: int = 0):
    """gate and up [..., I] as an MLP hands them over.  ``layout``: "joined" (the two halves of one
    gate/up GEMM output [..., 2 I], as a fused W4A8 GPU load gives them), "contiguous".  Values
    over many magnitudes: subnormal to past exp's float32 range (silu -0 and x), both signs."""
    gen = torch.Generator().manual_seed(seed * 7919 + sum(shape) * 131 + len(shape))
    *lead, cols = shape
    scale = 10.0 ** torch.randint(-6, 3, (*lead, 1), generator=gen).float()
    if layout == "joined":
        j = (torch.randn(*lead, 2 * cols, generator=gen) * scale * 4).to(dtype)
        return j[..., :cols], j[..., cols:]
    g = (torch.randn(*shape, generator=gen) * scale * 4).to(dtype)
    return g, (torch.randn(*shape, generator=gen) * 3).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def run_swiglu(shape=(3, 300), dtype=torch.float16, layout="joined", mutations=frozenset()):
    gate, up = swiglu_case(shape, dtype, layout)
    with emulate.emulating(mutations=mutations) as emu:
        out = ks.swiglu(gate, up)
    rows = gate.numel() // shape[-1]
    assert emu.launches == [(f"swiglu_{'f16' if dtype == torch.float16 else 'bf16'}", (rows, -(-shape[-1] // 256)),
                             (256,))]
    want = ref.swiglu(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype
    assert torch.equal(bits(out), bits(want)), f"the output differs in {(bits(out) != bits(want)).sum()} places"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", [
    ((1, 1), "contiguous"), ((1, 14336), "joined"), ((3, 300), "joined"), ((2, 5, 257), "joined"),
    ((17, 1536), "contiguous"), ((4, 255), "contiguous"), ((7,), "contiguous"),
])
def test_the_emulated_kernel_equals_the_reference(shape, layout, dtype):
    """Odd shapes: one element; Llama-3-8B's decode row (I = 14336: 56 CTAs); the two halves of a
    joined gate/up output (a row stride of 2 I); [B, T, I] inputs; rows one past and one short of a
    CTA's 256 columns; a single vector."""
    run_swiglu(shape, dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_reference_is_torchs_silu_times_up_but_for_exp(dtype):
    """transformers' act_fn(gate) * up on the CPU against the definition: equal bit for bit on
    262,144 random pairs of each dtype over many magnitudes, on every 16-bit gate value (the silu,
    up = 1; infinities, subnormals, exp past float32's range; -inf gives NaN on both sides) and
    at a few extremes.  The float32 exp is where the two could part (torch's CPU exp is not the
    reference's stand-in, and neither is CUDA's expf: tests/test_kernels_swiglu_gpu.py)."""
    from transformers.activations import ACT2FN

    gate, up = swiglu_case((64, 4096), dtype, "contiguous", seed=3)
    want = ACT2FN["silu"](gate) * up
    got = ref.swiglu(gate, up)
    assert torch.equal(bits(got), bits(want)), int((bits(got) != bits(want)).sum())
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)  # every 16-bit gate
    every = every[~torch.isnan(every)]
    one = torch.ones_like(every)
    got, want = ref.swiglu(every, one), ACT2FN["silu"](every) * one
    nan = torch.isnan(want)  # silu(-inf) = -inf / inf: NaN on both sides, the bit pattern each its own
    assert torch.equal(torch.isnan(got), nan) and int(nan.sum()) == 1
    assert torch.equal(bits(got[~nan]), bits(want[~nan]))
    edge = torch.tensor([-1e4, -200.0, -90.0, -88.0, -1e-7, 0.0, 1e-7, 5.0, 89.0, 1e4]).to(dtype)
    one = torch.ones_like(edge)
    assert torch.equal(bits(ref.swiglu(edge, one)), bits(ACT2FN["silu"](edge) * one))


MUTATION_CASES = {  # mutation: what catches it ("differs": the output; "error": the emulator's memory checks)
    "unrounded_silu": "differs",
    "exp_sign": "differs",
    "gate_up_swapped": "differs",
    "up_with_gate_stride": "error",  # contiguous up [3, 300] read with a joined row stride of 600: past its view
    "no_column_bound": "error",  # column 300 of a row: the next row's first element, outside a joined half
}


def run_mutant(mutations=frozenset()):
    layout = "contiguous" if "up_with_gate_stride" in mutations else "joined"
    gate, up = swiglu_case((3, 300), torch.float16, layout)
    if layout == "contiguous":  # gate a joined half (row stride 600), up contiguous (300)
        gate = torch.cat([gate, gate], -1)[:, :300]
    with emulate.emulating(mutations=mutations):
        out = ks.swiglu(gate, up)
    want = ref.swiglu(gate, up)
    assert torch.equal(bits(out), bits(want)), f"the output differs in {(bits(out) != bits(want)).sum()} places"


test_mutation_is_caught, test_every_mutation_has_a_test = mutation_tests(run_mutant, MUTATION_CASES,
                                                                         emulate.MUTATIONS)


def test_the_emulator_checks_what_the_kernel_touches(monkeypatch):
    """The emulator's own checks, each made to fire: an output overlapping an input (past the
    launcher's check), an output view a launch would write twice, and an argument of the wrong type."""
    from qconvert_kernels import launch

    gate, up = swiglu_case((3, 8), torch.float16, "contiguous")
    with emulate.emulating(), pytest.raises(ValueError, match="shares memory with an input"):
        ks.swiglu(gate, up, out=gate)
    with emulate.emulating(), pytest.raises(AssertionError, match="overlaps"):  # a launch writing gate in place
        emulate.run("swiglu_f16", (3, 1), (launch.ptr(gate), launch.ptr(up), launch.ptr(gate), np.int32(8),
                    np.int64(8), np.int64(8), np.int64(8)))
    twice = torch.empty(1, 8, dtype=torch.float16).expand(3, 8)  # three rows on one
    with emulate.emulating(), pytest.raises(ValueError, match="out .* has elements that share memory"):
        ks.swiglu(gate, up, out=twice)
    with emulate.emulating(), pytest.raises(AssertionError, match="written"):
        emulate.run("swiglu_f16", (3, 1), (launch.ptr(gate), launch.ptr(up), launch.ptr(twice), np.int32(8),
                    np.int64(8), np.int64(8), np.int64(0)))
    assert_wrong_arg_type_refused(monkeypatch, emulate.emulating, lambda: ks.swiglu(gate, up))


def test_the_emulator_reads_the_kernels_own_argument_list():
    """emulate.PARAMS is swiglu.cu's QS_ARGS, name for name, and its types the declared ones."""
    from helpers import assert_kernel_args

    assert_kernel_args(ks.SOURCE.read_text(), "QS_ARGS", emulate.PARAMS, emulate.PARAM_TYPES)


def test_layouts_the_kernel_cannot_read_are_copied_and_bad_input_refused():
    gate, up = swiglu_case((4, 6), torch.float16, "contiguous")
    with emulate.emulating():
        for g, u in ((gate.t(), up.t()), (gate[:, ::2], up[:, ::2])):  # columns strided: copied first
            assert torch.equal(bits(ks.swiglu(g, u)), bits(ref.swiglu(g, u)))
        assert ks.swiglu(gate[:0], up[:0]).shape == (0, 6)
        with pytest.raises(ValueError, match="out must be"):
            ks.swiglu(gate[:0], up[:0], out=torch.empty(5, 5))
        with pytest.raises(ValueError, match="gate must be float16 or bfloat16"):
            ks.swiglu(gate.float(), up)
        with pytest.raises(ValueError, match="up must be torch.float16 like gate"):
            ks.swiglu(gate, up.bfloat16())
        with pytest.raises(ValueError, match="must have one shape"):
            ks.swiglu(gate, up[:3])
        with pytest.raises(ValueError, match="out must be"):
            ks.swiglu(gate, up, out=torch.empty(4, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="CUDA"):
        ks.swiglu(gate, up)  # CPU tensors outside the emulator


def _modeling(name: str):
    return importlib.import_module(MODELING[name])


@pytest.mark.parametrize("name", MLP_CLASSES)
def test_the_mlp_classes_compute_the_llama_formula(name):
    """Each known class's forward, in the installed transformers, is down_proj(act_fn(gate_proj(x)) *
    up_proj(x)): what the kernel's forward computes."""
    src = inspect.getsource(getattr(_modeling(name), name).forward)
    body = [ln.strip() for ln in src.splitlines()[1:] if ln.strip() and not ln.strip().startswith(("#", '"""'))]
    assert body == ["down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))", "return down_proj"]


def test_the_joined_mlp_classes_compute_phi3s_formula():
    """Phi-3's forward, in the installed transformers: gate and up as the two halves of one
    gate_up_proj, then down_proj(up * activation_fn(gate)): what the joined kernel forward computes."""
    for name in JOINED_MLP_CLASSES:
        src = inspect.getsource(getattr(_modeling(name), name).forward)
        body = [ln.strip() for ln in src.splitlines()[1:] if ln.strip() and not ln.strip().startswith(("#", '"""'))]
        assert body == ["up_states = self.gate_up_proj(hidden_states)", "gate, up_states = up_states.chunk(2, dim=-1)",
                        "up_states = up_states * self.activation_fn(gate)", "return self.down_proj(up_states)"], name


def test_a_phi3_runs_its_joined_mlps_on_the_kernel(tmp_path, monkeypatch):
    """A tiny Phi-3 in float16: each MLP's activation is the kernel's on the two strided halves of
    gate_up_proj's output (no copy: the launch reads gate_up_proj's own output), equal to the
    reference bit for bit, one launch an MLP; the logits stay within the exp stand-in's ulps."""
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config, write_model

    src = write_model(tmp_path / "phi3", tiny_config("phi3"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250]])
    with torch.no_grad():
        want = model(ids).logits
    n = use_swiglu_kernels(model, "cpu")
    assert n == model.config.num_hidden_layers and use_swiglu_kernels(model, "cpu") == 0
    seen = collections.defaultdict(list)
    for mod in model.modules():
        if type(mod).__name__ == "Phi3MLP":
            mod.gate_up_proj.register_forward_hook(lambda m, a, o: seen["gate_up"].append(o))
            mod.down_proj.register_forward_pre_hook(lambda m, a: seen["act"].append(a[0]))
    args, real_run = [], emulate.run
    monkeypatch.setattr(emulate, "run", lambda name, grid, a, mutations=frozenset(): (args.append(a),
                                                                                      real_run(name, grid, a, mutations)))
    with torch.no_grad(), emulate.emulating() as emu:
        got = model(ids).logits
    assert len(emu.launches) == n == len(args)
    inter = model.config.intermediate_size
    for y, a, (pg, pu, _, cols, gs, us, _) in zip(seen["gate_up"], seen["act"], args, strict=True):
        gate, up = y.chunk(2, dim=-1)
        assert torch.equal(bits(a), bits(ref.swiglu(gate, up)))
        # the halves of gate_up_proj's own output, rows 2I apart: read in place
        assert (int(pg), int(pu), int(cols), int(gs), int(us)) == (y.data_ptr(), y.data_ptr() + 2 * inter, inter,
                                                                   2 * inter, 2 * inter)
    assert float((got.float() - want.float()).abs().max()) <= 0.02 * float(want.float().abs().max())
    with emulate.emulating() as emu, torch.enable_grad():
        model(ids)  # grad enabled: transformers' ops
    assert len(emu.launches) == 0


def _capture(model):
    """Hooks recording each MLP's gate and up outputs and down_proj's input, in call order."""
    seen = collections.defaultdict(list)
    for mod in model.modules():
        if type(mod).__name__ == "LlamaMLP":
            mod.gate_proj.register_forward_hook(lambda m, a, o: seen["gate"].append(o))
            mod.up_proj.register_forward_hook(lambda m, a, o: seen["up"].append(o))
            mod.down_proj.register_forward_pre_hook(lambda m, a: seen["act"].append(a[0]))
    return seen


def test_a_model_runs_its_mlps_on_the_kernel(tiny_llama):
    """A tiny Llama in float16 with its MLPs on the emulated kernel: every MLP's activation equals
    the reference of its own gate and up bit for bit, one launch an MLP; the logits stay within the
    exp stand-in's ulps of transformers'; a second call sets nothing new; grad mode and another
    device keep transformers' forward."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250]])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).eval()
    with torch.no_grad():
        want = model(ids).logits
    n = use_swiglu_kernels(model, "cpu")
    assert n == model.config.num_hidden_layers and use_swiglu_kernels(model, "cpu") == 0
    seen = _capture(model)
    with torch.no_grad(), emulate.emulating() as emu:
        got = model(ids).logits
    assert len(emu.launches) == n
    for g, u, a in zip(seen["gate"], seen["up"], seen["act"]):
        assert torch.equal(bits(a), bits(ref.swiglu(g, u)))
    assert float((got.float() - want.float()).abs().max()) <= 0.02 * float(want.float().abs().max())
    with emulate.emulating() as emu:
        with torch.enable_grad():
            model(ids)  # grad enabled: transformers' ops
        model.model.layers[0].mlp.swiglu_kernel_device = torch.device("meta")
        with torch.no_grad():
            model(ids)
    assert len(emu.launches) == n - 1


def test_only_transformers_own_silu_mlps_are_set(tiny_llama):
    """An MLP of a known class with another activation, and a class of the same name from elsewhere
    (remote code), keep their forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).eval()
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    Elsewhere = type("LlamaMLP", (torch.nn.Module,), {"__module__": "remote_llama"})
    model.model.layers[1].mlp.__class__ = type("LlamaMLP", (Elsewhere, type(model.model.layers[1].mlp)),
                                               {"__module__": "remote_llama"})
    assert use_swiglu_kernels(model, "cpu") == model.config.num_hidden_layers - 2
    assert "forward" not in model.model.layers[0].mlp.__dict__ and "forward" not in model.model.layers[1].mlp.__dict__


def test_a_w4a8_decode_step_runs_its_mlps_on_the_swiglu_kernel(tiny_rtn_out):
    """The GPU path's decode (an is-w4a8 OUT set up as a GPU load sets it up: gate/up joined, so gate
    and up are the halves of one GEMM output; norms, RoPE and the cache on their kernels), every
    launch emulated: each step's MLP activations equal the reference bit for bit, one swiglu launch a
    block a forward, no op reads a value back to the host, and no silu runs as a torch op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from helpers import w4a8_gpu_load_on_cpu
    from qconvert.engine import DecodeEngine
    from qconvert_kernels.kvcache import emulate as kv_emulate
    from qconvert_kernels.norm import emulate as norm_emulate
    from qconvert_kernels.rope import emulate as rope_emulate
    from qconvert_kernels.w4a8 import emulate as w4a8_emulate

    model = w4a8_gpu_load_on_cpu(tiny_rtn_out, ("norm", "rope", "swiglu"))
    seen = _capture(model)
    ops = collections.Counter()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    ids = torch.randint(1, 300, (2, 5), generator=torch.Generator().manual_seed(5))
    with w4a8_emulate.emulating(sm_count=8), norm_emulate.emulating(), rope_emulate.emulating(), \
            kv_emulate.emulating(), emulate.emulating() as emu:
        eng = DecodeEngine(model, 2, 10, cache_kernel=True)
        logits = eng.prefill(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
        with Ops():
            for _ in range(2):
                logits = eng.decode(logits.argmax(-1)).clone()
    blocks = model.config.num_hidden_layers
    assert len(emu.launches) == 3 * blocks and len(seen["act"]) == 3 * blocks
    for g, u, a in zip(seen["gate"], seen["up"], seen["act"]):
        assert g.untyped_storage().data_ptr() == u.untyped_storage().data_ptr()  # halves of one joined GEMM's output
        assert torch.equal(bits(a), bits(ref.swiglu(g, u)))
    assert not {"aten::silu", "aten::index_copy_", "aten::_local_scalar_dense", "aten::item"} & set(ops), ops


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_the_build_reads_each_value_once_and_rounds_twice(arch):
    """The cubins the launcher loads (NVRTC, the launch options): per thread two 16-bit loads and
    one store, one MUFU.EX2 (CUDA's expf, as torch's silu compiles it), the quotient in float64
    (DFMA, no float32 division routine), two roundings to the dtype (silu's, the product's), no
    integer division's reciprocal."""
    from helpers import kernel_ops
    from qconvert_kernels.swiglu import SWIGLU

    built = kernel_ops(SWIGLU.path, arch)
    for name in SWIGLU.kernels:
        ops, count = built[name]
        rounds = sum(n for op, n in ops.items() if op.startswith(("F2FP", "F2F.F16.F32", "F2F.BF16.F32")))
        assert (count["LDG"], count["STG"], ops.get("MUFU.EX2", 0), rounds) == (2, 1, 1, 2), (arch, name, dict(ops))
        assert count["DFMA"] > 0 and ops.get("MUFU.RCP", 0) == 0 and count["I2F"] == 0, (arch, name, dict(ops))
