"""I-LLM: the integer operators against float math, the integer-only property of the runtime
(every torch call between the embedding lookup and the integer logits traced), smoothing that
leaves the float function unchanged, and the presets end to end on a tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch.overrides import TorchFunctionMode

from helpers import quantize_tiny
from qconvert.cli import cli
from qconvert_kernels.illm import reference as ri


def _real(q: torch.Tensor, d: ri.Dyadic) -> torch.Tensor:
    return q.double() * d.m.double() / torch.pow(2.0, d.k.double())


# ------------------------------------------------------------------ operators


def test_isqrt_and_bit_length_are_exact():
    gen = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randint(0, 2**62, (5000,), generator=gen), torch.tensor([0, 1, 2, 3, 4, 2**62 - 1])])
    x = ri.isqrt(v)
    assert ((x * x <= v) & ((x + 1) * (x + 1) > v)).all()
    assert ri.bit_length(torch.tensor([0, 1, 2, 3, 255, 256, 2**40])).tolist() == [0, 1, 2, 2, 8, 9, 41]


def test_dyadic_arithmetic():
    d = ri.ratio(torch.tensor([1, 3, 1000]), torch.tensor([3, 7, 1]))
    assert torch.allclose(_real(torch.ones(3, dtype=torch.long), d), torch.tensor([1 / 3, 3 / 7, 1000.0], dtype=torch.float64), rtol=2**-15)
    assert ((d.m >> 15) == 1).all()  # 16-bit normalized mantissas
    v = torch.randint(-2**44, 2**44, (4, 300), generator=torch.Generator().manual_seed(1))
    q, r = ri.quantize_rows(v, 127)
    assert q.abs().max() <= 127 and (q.abs().amax(1) == 127).all()
    assert ((_real(q, r) - v.double()).abs().amax(1) <= v.abs().amax(1).double() / 127 * 0.5001).all()


def test_di_exp2_relative_error():
    u = -torch.arange(0, 20 * 2**16, 37)
    got = ri.di_exp2(u).double() / 2**16
    ref = torch.pow(2.0, u.double() / 2**16)
    assert float(((got - ref).abs() / ref)[ref > 2**-6].max()) < 0.004  # the quadratic's 0.27 % + rounding
    assert float((got - ref).abs().max()) <= 2**-16 * 1.01 + 0.0027


def test_di_softmax_matches_float_softmax():
    gen = torch.Generator().manual_seed(2)
    real = torch.randn(6, 64, generator=gen) * 4
    scale = ri.ratio(torch.tensor(1), torch.tensor(2000))
    scores = torch.round(real * 2000).long()
    mask = torch.ones(6, 64, dtype=torch.bool).tril(diagonal=30)
    p = ri.di_softmax(scores, scale, mask)
    ref = torch.softmax(torch.where(mask, scores / 2000.0, -torch.inf), -1)
    assert p.dtype == torch.int64 and (p[~mask] == 0).all()
    assert float((p / 2**15 - ref).abs().max()) < 2e-3
    assert ((p.sum(-1) - 2**15).abs() <= 64).all()


def test_di_rmsnorm_and_silu():
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-2**20, 2**20, (3, 576), generator=gen)
    g = torch.randint(2**13, 2**15, (576,), generator=gen)
    q, s = ri.di_rmsnorm(x, g, 14, 127)
    xf = x.double()
    ref = xf / torch.sqrt((xf * xf).mean(-1, keepdim=True)) * g.double() / 2**14
    assert float((_real(q, s) - ref).norm() / ref.norm()) < 0.01
    gi = torch.arange(-2**15, 2**15, 7)
    scale = ri.ratio(torch.tensor(1), torch.tensor(4096))
    y = ri.di_silu(gi, scale).double() / 4096
    xr = gi.double() / 4096
    assert float((y - xr * torch.sigmoid(xr)).abs().max()) < 2e-3


def test_int_mm_operands_meet_cuda_int_mm_shapes_and_layout():
    """The CUDA rule pads to M > 16 and M, K, N multiples of 8, adding as few zeros as that needs,
    and hands b over column-major (cuBLASLt's int8 "TN" product: row-major b was refused on an
    H200); the padded product, cut back, is the product.  The CPU rule pads nothing."""
    for m, k, n in [(1, 64, 304), (17, 64, 300), (24, 64, 304), (130, 1000, 13), (8, 3, 1)]:
        pm, pk, pn = ri.int_mm_padding(m, k, n)
        mm, kk, nn = m + pm, k + pk, n + pn
        assert mm > 16 and kk >= 16 and nn >= 16 and mm % 8 == kk % 8 == nn % 8 == 0, (m, k, n)
        assert pm < 8 or mm == 24
        gen = torch.Generator().manual_seed(m + k + n)
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
        pa, pb = ri.int_mm_operands(a, b, cuda=True)
        assert pa.shape == (mm, kk) and pb.shape == (kk, nn)
        assert pa.is_contiguous() and pb.stride() == (1, kk)  # b column-major: the TN product
        assert torch.equal(torch._int_mm(pa, pb)[:m, :n].long(), a.long() @ b.long())
        ca, cb = ri.int_mm_operands(a, b)
        assert ca.shape == (m, k) and cb.shape == (k, n) and cb.is_contiguous()
    assert ri.int_mm_padding(17, 64, 304) == (7, 0, 0)


def test_integer_matmuls_are_exact():
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(-2**15, 2**15 + 1, (20, 64), generator=gen)
    a[0, 0] = 2**15
    b = torch.randint(-128, 128, (64, 8), generator=gen)
    assert torch.equal(ri.wide_matmul(a, b), a @ b)
    small = torch.randint(-127, 128, (3, 64), generator=gen)
    assert torch.equal(ri.int8_matmul(small, b), small @ b)
    # torch._int_mm and the exact integer product, at the extremes too (every product 2^14, K = 4099:
    # sums far beyond float32's 2^24)
    big_a = torch.full((19, 4099), -128, dtype=torch.int8)
    big_b = torch.full((4099, 5), -128, dtype=torch.int8)
    big_a[1:] = torch.randint(-128, 128, (18, 4099), generator=gen, dtype=torch.int8)
    with ri.int_mm_only():
        strict = ri.int8_matmul(big_a, big_b)
    assert torch.equal(ri.int8_matmul(big_a, big_b), strict)
    assert int(strict[0, 0]) == 4099 * 2**14 and torch.equal(strict, big_a.long() @ big_b.long())
    # every CPU path gives those integers: the float32 one in slices of 1,024 of K (one whole float32
    # GEMM of K = 4099 would round: its sums pass 2^24), with the weights given as float32 or not,
    # batched or not; in lower float32 precision (bf16 allowed) the float64 GEMM instead
    odd = torch.full((2, 4099), 127, dtype=torch.int8)
    odd_b = torch.full((4099, 3), 127, dtype=torch.int8)  # each sum 4099 x 16129, odd and beyond 2^25
    assert not torch.equal((odd.float() @ odd_b.float()).long(), odd.long() @ odd_b.long())  # float32 whole: rounds
    assert ri.cpu_gemm_path() == ("int_mm" if ri.cpu_has_int8_dot() else "float32")
    for path in ri.GEMM_PATHS:
        with ri.gemm_path(path):
            assert ri.cpu_gemm_path() == path and ri.float32_gemm(big_a) == (path == "float32")
            assert torch.equal(ri.int8_matmul(odd, odd_b), odd.long() @ odd_b.long()), path
            assert torch.equal(ri.int8_matmul(big_a, big_b, big_b.float()), strict), path
            assert torch.equal(ri.int8_matmul(small, b), small @ b), path
            assert torch.equal(ri.int8_matmul(torch.stack([big_a, big_a.flip(0)]), torch.stack([big_b, big_b])),
                               torch.stack([strict, strict.flip(0)])), path
            assert torch.equal(ri.wide_matmul(a, b), a @ b), path
    # unforced, a batch takes one exact float GEMM even where 2-D products take torch._int_mm
    calls = []
    real = torch._int_mm
    try:
        torch._int_mm = lambda *x: calls.append(1) or real(*x)
        got = ri.int8_matmul(torch.stack([big_a, big_a.flip(0)]), torch.stack([big_b, big_b]))
    finally:
        torch._int_mm = real
    assert torch.equal(got, torch.stack([strict, strict.flip(0)])) and not calls
    was = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with ri.gemm_path("float32"):
            assert ri.cpu_gemm_path() == "float64" and not ri.float32_gemm(big_a)
            assert torch.equal(ri.int8_matmul(odd, odd_b), odd.long() @ odd_b.long())
    finally:
        torch.set_float32_matmul_precision(was)
    with pytest.raises(ValueError, match="not one of"):
        with ri.gemm_path("float16"):
            pass


@pytest.mark.parametrize("m,lp", [(20, 3), (12, 4), (1, 5)])
def test_integer_hadamard_is_the_matrix_product(m, lp):
    """``hadamard_rows`` is v (A (x) H_p) exactly, and over sqrt(n) the float transform of
    qconvert_kernels/hadamard/reference.py (which the float path and the kernel use)."""
    from qconvert.online_hadamard import OnlineHadamard
    from qconvert_kernels.hadamard import reference as hr

    t = OnlineHadamard(m << lp)
    assert (t.m, t.lp) == (m, lp)
    gen = torch.Generator().manual_seed(m + lp)
    v = torch.randint(-2**30, 2**30, (5, m << lp), generator=gen)
    h = torch.ones(1, 1, dtype=torch.int64)
    for _ in range(lp):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    full = torch.kron(t.sign.long(), h)
    got = ri.hadamard_rows(v, t.sign, t.lp)
    assert torch.equal(got, v @ full)
    x = v[:2].double() / 2**30
    torch.testing.assert_close(got[:2].double() / 2**30 / math.sqrt(m << lp),
                               hr.transform(x.float(), t.sign, t.lp, t.scale).double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="order"):
        ri.hadamard_rows(v[:, 1:], t.sign, t.lp)


def test_online_hadamard_in_the_integer_runtime(tiny_calib_src, tmp_path, monkeypatch):
    """illm-w4a4 (its default ``--rotate hadamard+online``): down_proj's smoothing stays off (the transform
    stands between up_proj and down_proj), the integer runtime transforms that input in integers
    (still integer-only), its logits follow the float source, and not without the transform;
    verify passes."""
    from qconvert import runtime
    from qconvert import verify as verify_mod
    from qconvert.layouts.illm import IntegerLlama
    from qconvert.source import resolve_source

    out = tmp_path / "w4a4-online"
    res = quantize_tiny(tiny_calib_src, out, "illm-w4a4")  # the preset's default
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "down_proj's input rotated online" in res.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["online_rotation"]["order"] == 160 and len(qc["online_rotation"]["modules"]) == 2
    assert qc["config"]["act_clip"] == 0.9  # the preset clips its activations
    model = runtime.load(out)
    assert isinstance(model, IntegerLlama) and model.model.layers[0].mlp.down_proj.clip == ri.clip_int(0.9)
    for blk in model.model.layers:
        assert blk.mlp.down_proj.online_transform is not None
        assert torch.equal(blk.mlp.down_proj.smooth, torch.ones(160))  # s4 = 1
        assert torch.equal(blk.mlp.up_proj.out_smooth, torch.ones(160))
        assert not torch.equal(blk.mlp.gate_proj.smooth, torch.ones(64))  # the other pairs still smoothed
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with _Trace() as trace, ri.int_mm_only():
        model.forward_int(ids[0])
    assert not [n for n, dts in trace.calls for d in dts if d.is_floating_point], "a float op in forward_int"
    assert any(n == "add_" for n, _ in trace.calls)  # the butterflies ran

    want = resolve_source(str(tiny_calib_src)).load_model(torch.float32)(ids).logits
    err = lambda y: float((y.float() - want).abs().max() / want.abs().max())  # noqa: E731
    good = model(ids).logits
    float_view = runtime.load(out, integer=False)(ids).logits
    monkeypatch.setattr(runtime, "_attach_online", lambda *a: None)
    bad = runtime.load(out)(ids).logits
    monkeypatch.undo()
    gap = lambda y: float((y.float() - float_view).abs().max() / float_view.abs().max())  # noqa: E731
    print(f"vs source: integer {err(good):.4f}, float view {err(float_view):.4f}, no transform {err(bad):.4f}; "
          f"vs float view: integer {gap(good):.4f}, no transform {gap(bad):.4f}")
    assert err(good) < err(bad) and gap(good) < 0.5 * gap(bad), (err(good), err(bad), gap(good), gap(bad))
    rep = verify_mod.verify(out, against=str(tiny_calib_src), save=False)
    assert rep.ok, rep.failures


def test_rope_table_rotation():
    cos, sin = ri.rope_table(16, 8, 10000.0)
    x = torch.randint(-2**14, 2**14, (16, 8), generator=torch.Generator().manual_seed(5))
    got = ri.rope(x, cos, sin).double()
    ang = torch.arange(16, dtype=torch.float64)[:, None] / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    c, s = torch.cos(ang), torch.sin(ang)
    xf = x.double()
    ref = torch.cat([xf[:, :4] * c - xf[:, 4:] * s, xf[:, 4:] * c + xf[:, :4] * s], 1)
    assert float((got - ref).abs().max()) <= 3.0  # the table's 2^-14 rounding on |x| < 2^14, and a half


# ------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def illm_out(tiny_calib_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("illm") / "w8a8"
    res = quantize_tiny(tiny_calib_src, out, "illm-w8a8")
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out


class _Trace(TorchFunctionMode):
    """Records the dtype of every tensor each torch call returns."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        dts = [t.dtype for t in flat if isinstance(t, torch.Tensor)]
        self.calls.append((getattr(func, "__name__", str(func)), dts))
        return out


def test_integer_only_between_embedding_and_logits(illm_out):
    """Every torch call of forward_int returns integer or bool tensors: zero float operations per
    token (with the GEMMs on torch._int_mm; the CPU's other GEMM paths give equal logits).  The same trace over forward (which converts the logits to float at the end) does
    see float results, so the check can fail."""
    from qconvert import load

    model = load(illm_out)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with _Trace() as trace, ri.int_mm_only():
        acc, scale = model.forward_int(ids[0])
    with ri.gemm_path("float32"):
        assert torch.equal(acc, model.forward_int(ids[0])[0])  # the exact float32 GEMMs: the same integers
    floats = [(name, d) for name, dts in trace.calls for d in dts if d.is_floating_point or d.is_complex]
    assert floats == [], floats[:5]
    assert len(trace.calls) > 1000 and acc.dtype == torch.int64 and scale.m.dtype == torch.int64
    per_token = sum(1 for _, dts in trace.calls if dts) / ids.shape[1]
    assert per_token > 0
    with _Trace() as trace:
        model(ids)
    assert any(d.is_floating_point for _, dts in trace.calls for d in dts)


def test_model_close_to_float_and_verify(illm_out, tiny_calib_src):
    from transformers import AutoModelForCausalLM

    from qconvert import load
    from qconvert.verify import verify

    model = load(illm_out)
    ref = AutoModelForCausalLM.from_pretrained(tiny_calib_src, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = model(ids).logits, ref(ids).logits
    assert a.shape == b.shape and float((a - b).norm() / b.norm()) < 0.05
    rep = verify(illm_out, data_file=tiny_calib_src.parent / "calib.txt")
    assert rep.ok, rep.failures
    assert rep.top1_agreement > 0.9 and rep.min_snr_db > 20
    # the float model of the same OUT (quantized linears, float glue): close to both
    sim = load(illm_out, integer=False)
    assert type(sim).__name__ != "IntegerLlama"
    c = sim(ids).logits
    assert float((c - b).norm() / b.norm()) < 0.05 and float((c - a).norm() / a.norm()) < 0.05


def test_smoothing_keeps_the_float_function(tiny_calib_src):
    """prepare_block folds s into the norms and linears: the block computes the same function."""
    from transformers import AutoModelForCausalLM

    from qconvert.methods.illm import ILLMMethod

    ref = AutoModelForCausalLM.from_pretrained(tiny_calib_src, dtype=torch.float32)
    blk = ref.model.layers[0]
    x = torch.randn(2, 12, ref.config.hidden_size) * 3
    pos = torch.arange(12)[None].expand(2, -1)
    kw = {"position_embeddings": ref.model.rotary_emb(x, pos), "attention_mask": None}
    with torch.no_grad():
        before = blk(x, **kw)
        before = before[0] if isinstance(before, tuple) else before
        meth = ILLMMethod({})
        changed = meth.prepare_block("model.layers.0.", blk, lambda: iter([(x, kw)]))
        after = blk(x, **kw)
        after = after[0] if isinstance(after, tuple) else after
    assert set(changed) == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"}
    assert float((after - before).abs().max()) < 1e-4 * float(before.abs().max())
    s = meth._smooth["model.layers.0.self_attn.q_proj"]
    assert not torch.allclose(s, torch.ones_like(s))  # something was smoothed


def _quantized_block_error(blk, x, kw, target, bits: int) -> float:
    """MSE of the block run with per-channel RTN weights and per-token inputs at ``bits``
    (written here independently of qconvert.methods.fsbr) against ``target``."""
    import copy

    qmax = (1 << (bits - 1)) - 1

    def rtn(t):
        s = t.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
        return torch.clamp(torch.round(t / s), -qmax, qmax) * s

    q = copy.deepcopy(blk)
    for mod in q.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.weight.data = rtn(mod.weight.data)
            mod.register_forward_pre_hook(lambda m, a: (rtn(a[0]),))
    with torch.no_grad():
        y = q(x, **kw)
    return float(((y[0] if isinstance(y, tuple) else y) - target).pow(2).mean())


def test_fsbr_reconstruction_lowers_the_quantized_block_error(tiny_calib_src):
    """The refined factors beat the SmoothQuant initialisation on the quantized block's error
    (measured here with an independent fake-quant), and the float function stays the same."""
    import copy

    from transformers import AutoModelForCausalLM

    from qconvert.methods.illm import ILLMMethod

    ref = AutoModelForCausalLM.from_pretrained(tiny_calib_src, dtype=torch.float32)
    blk = ref.model.layers[0]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, ref.config.hidden_size, generator=gen)
    x[..., :3] *= 25  # outlier channels, as real residual streams have
    kw = {"position_embeddings": ref.model.rotary_emb(x, torch.arange(16)[None].expand(4, -1)), "attention_mask": None}
    with torch.no_grad():
        target = blk(x, **kw)
        target = target[0] if isinstance(target, tuple) else target
    errors, stats = {}, {}
    for steps in (0, 40):
        b = copy.deepcopy(blk)
        meth = ILLMMethod({"w_bits": 4, "a_bits": 4, "fsbr_steps": steps})
        with torch.no_grad():
            meth.prepare_block("model.layers.0.", b, lambda: iter([(x, kw)]))
            y = b(x, **kw)
        y = y[0] if isinstance(y, tuple) else y
        assert float((y - target).abs().max()) < 1e-4 * float(target.abs().max())  # folded exactly
        errors[steps] = _quantized_block_error(b, x, kw, target, 4)
        stats[steps] = meth._fsbr_stats
    assert stats[0] == {}
    st = stats[40]["model.layers.0."]
    assert st["kept"] and st["steps"] == 40 and st["loss_refined"] < st["loss_init"]
    assert errors[40] < 0.95 * errors[0], errors


@pytest.mark.parametrize("scheme,extra", [("illm-w4a8", []), ("illm-w4a4", ["--no-fsbr"])])
def test_presets_quantize_verify_eval(tiny_calib_src, tmp_path, scheme, extra):
    out = tmp_path / "out"
    res = quantize_tiny(tiny_calib_src, out, scheme, *extra)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads((out / "qconvert.json").read_text())
    assert {r["layout"] for r in rep["layers"]} == {scheme} and all(r["fsbr"] == (not extra) for r in rep["layers"])
    recon = [r.get("fsbr_reconstruction") for r in rep["layers"]]
    assert all(r is None for r in recon) if extra else all(r["steps"] == 32 and r["loss_init"] > 0 for r in recon)
    ev = CliRunner().invoke(cli, ["eval", str(out), "--data-file", str(tiny_calib_src.parent / "calib.txt"),
                                  "--seqlen", "16", "--json", "-q"])
    assert ev.exit_code == 0, ev.output
    assert math.isfinite(json.loads(ev.stdout)["perplexity"])
    assert CliRunner().invoke(cli, ["verify", str(out), "--no-compare"]).exit_code == 0


def test_option_and_parameter_errors(tiny_calib_src, tmp_path):
    from qconvert.errors import QConvertError
    from qconvert.methods.illm import ILLMMethod

    res = quantize_tiny(tiny_calib_src, tmp_path / "a", "is-w4a8", "--no-fsbr")
    assert res.exit_code != 0 and "--fsbr / --no-fsbr applies to i-llm schemes" in res.output
    for bad, msg in [({"w_bits": 3}, "must be 4 or 8"), ({"alpha": 2}, "alpha"), ({"group_size": 128}, "allowed parameters"),
                     ({"fsbr_steps": -1}, "fsbr_steps"), ({"fsbr_batch": 0}, "fsbr_batch"), ({"fsbr_lr": 0}, "fsbr_lr")]:
        with pytest.raises(QConvertError, match=msg):
            ILLMMethod(bad)


def test_activation_clip(illm_out, tmp_path, monkeypatch):
    """``act_clip``: every linear's per-token input (DI-Norm's outputs, o_proj's and down_proj's inputs)
    is quantized over c x max |x| in the integer runtime, and the other requantizations are not; the
    float view and calibration's fake quantization saturate the same way; an OUT recorded without
    the key runs unclipped; a bad value is refused in one line."""
    import shutil

    from qconvert import runtime
    from qconvert.errors import QConvertError
    from qconvert.methods.fsbr import fake_quant_rows
    from qconvert.methods.illm import ILLMMethod

    out = tmp_path / "clipped"
    shutil.copytree(illm_out, out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["quantization_config"]["config"]["act_clip"] == 1.0  # illm-w8a8's default
    cfg["quantization_config"]["config"]["act_clip"] = 0.9
    cfg_path.write_text(json.dumps(cfg))
    model, plain = runtime.load(out), runtime.load(illm_out)
    assert {m.clip for m in model.modules() if hasattr(m, "clip")} == {ri.clip_int(0.9)} == {58982}
    seen, rows = [], ri.quantize_rows
    monkeypatch.setattr(ri, "quantize_rows", lambda v, qmax, clip=ri.CLIP_ONE: seen.append((qmax, clip)) or rows(v, qmax, clip))
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    got = model.forward_int(ids[0])
    clipped = [q for q, c in seen if c == ri.clip_int(0.9)]
    assert clipped == [127] * 4 * model.layers_n and all(c == ri.CLIP_ONE for q, c in seen if q != 127 or c != ri.clip_int(0.9))
    seen.clear()
    want = plain.forward_int(ids[0])
    assert {c for _, c in seen} == {ri.CLIP_ONE} and not torch.equal(got[0], want[0])
    lin = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, lin.in_features)
    lin_plain = plain.model.layers[0].self_attn.q_proj
    assert not torch.equal(lin(x), lin_plain(x))
    lin.clip = ri.CLIP_ONE
    assert torch.equal(lin(x), lin_plain(x))  # the clip is the only difference

    x = torch.tensor([[10.0, 1.0, -10.0, 5.0, 0.0]])
    want = torch.tensor([[5.0, 5 / 7, -5.0, 5.0, 0.0]])
    assert torch.allclose(ILLMMethod({"a_bits": 4, "act_clip": 0.5}).activation_fake_quant(x), want)
    assert torch.allclose(fake_quant_rows(x, 4, 0.5), want)
    assert torch.equal(ILLMMethod({"a_bits": 4}).activation_fake_quant(x), fake_quant_rows(x, 4))

    del cfg["quantization_config"]["config"]["act_clip"]  # an OUT made before the key: unclipped
    cfg_path.write_text(json.dumps(cfg))
    assert {m.clip for m in runtime.load(out).modules() if hasattr(m, "clip")} == {ri.CLIP_ONE}
    cfg["quantization_config"]["config"]["act_clip"] = 0.3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QConvertError, match=r"act_clip=0.3 of layout illm-w8a8 must be a number in \[0.5, 1\]"):
        runtime.load(out)
    for bad in (0.49, 1.01, True, "0.9"):
        with pytest.raises(QConvertError, match="act_clip=.* must be a number in"):
            ILLMMethod({"act_clip": bad})


def test_the_integer_model_is_causal_and_its_cache_exact(illm_out):
    """No scale spans tokens: the logits of 9 tokens are those of the first 9 of 13 run at once
    (per-head int8 keys over the sequence, the runtime before, failed this).  No scale spans rows:
    two rows run as one batch give each row's logits alone.  The integer KV cache: a prefill of 9
    tokens, then steps of 1, 2 and 1, give the 13 tokens' logits bit for bit, in each row of a
    batch of two; a foreign cache is refused."""
    from qconvert import load
    from qconvert.errors import QConvertError
    from qconvert.layouts.illm_cache import IntegerKVCache

    model = load(illm_out)
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    whole = model(ids).logits
    for r in range(2):
        assert torch.equal(model(ids[r:r + 1]).logits[0], whole[r]) and torch.equal(model.sequence_logits(ids[r]), whole[r])
    res = model(ids[:, :9], use_cache=True)
    assert torch.equal(res.logits, whole[:, :9])
    cache = res.past_key_values
    for a, b in ((9, 10), (10, 12), (12, 13)):
        res = model(ids[:, a:b], past_key_values=cache, use_cache=True)
        assert res.past_key_values is cache and cache.lengths == [b, b]
        assert torch.equal(res.logits, whole[:, a:b]), (a, b)
    (rows, seq), = cache.groups
    k8 = seq.blocks[1][0]
    assert rows == [0, 1] and k8.dtype == torch.int8 and k8.shape == (2, 2, 13, 16) and k8.abs().amax(-1).eq(127).all()
    assert cache.nbytes() == 2 * 2 * 13 * 2 * 2 * (16 + 16)  # rows x blocks x tokens x (k, v) x heads x (d + 2 x 8)
    with pytest.raises(QConvertError, match="IntegerKVCache of 1 rows .* not one of 2 rows and 2 blocks"):
        model(ids[:1, :1], past_key_values=cache)
    with pytest.raises(QConvertError, match="not one of 2 rows and 3 blocks"):
        model(ids[:, :1], past_key_values=IntegerKVCache(2, 3))
    with pytest.raises(QConvertError, match="not Tensor"):
        model(ids[:, :1], past_key_values=ids)
    with pytest.raises(QConvertError, match=r"groups \[\[0\], \[0\]\] must split rows 0..1 once each"):
        IntegerKVCache(2, 2, [[0], [0]])
    assert model(ids[:, :3], past_key_values=IntegerKVCache(2, 2)).past_key_values is None


def test_attention_blocks_cover_heads_and_rows_once():
    from qconvert.layouts.illm import ATTN_BLOCK_BYTES, attention_blocks

    cpu = torch.device("cpu")
    budget = ATTN_BLOCK_BYTES["cpu"]
    for heads, rows, row_bytes in ((3, 1, 3 * 600 * 8), (3, 512, 3 * 512 * 8), (8, 2048, 4 * 2048 * 8), (2, 17, 100),
                                   (5, 7, budget), (4, 3, 2 * budget)):
        seen = torch.zeros(heads, rows, dtype=torch.int64)
        blocks = attention_blocks(heads, rows, row_bytes, cpu)
        for (a, b), (r0, r1) in blocks:
            assert (b - a) * (r1 - r0) * row_bytes <= budget or (b - a, r1 - r0) == (1, 1)
            seen[a:b, r0:r1] += 1
        assert seen.eq(1).all(), (heads, rows, row_bytes)
    assert attention_blocks(3, 1, 3 * 600 * 8, cpu) == [((0, 3), (0, 1))]  # a decode step: every head at once
    assert len(attention_blocks(8, 2048, 4 * 2048 * 8, torch.device("cuda"))) < len(attention_blocks(8, 2048, 4 * 2048 * 8, cpu))


@pytest.mark.parametrize("budget,blocks_per_layer", [(1, 2 * 17), ("one head", 2)])
def test_attention_in_blocks_gives_the_same_bits(illm_out, monkeypatch, budget, blocks_per_layer):
    """Attention runs the query heads as one batched product per block of KV heads and query rows;
    blocks of one row of one KV head, or of one KV head, give the logits of one block for all."""
    from qconvert import load
    from qconvert.layouts import illm as illm_layout

    model = load(illm_out)
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(2))
    acc, scale = model.forward_int(ids)  # three rows: rows x KV heads on one axis
    calls = []
    real = ri.int8_matmul
    monkeypatch.setattr(ri, "int8_matmul", lambda a, b, *rest: calls.append(a.dim()) or real(a, b, *rest))
    group = model.heads // model.kv_heads
    row_bytes = group * 17 * 8
    monkeypatch.setitem(illm_layout.ATTN_BLOCK_BYTES, "cpu", 17 * row_bytes if budget == "one head" else budget)
    acc1, scale1 = model.forward_int(ids[1])
    assert torch.equal(acc1, acc[17:34]) and torch.equal(scale1.m, scale.m[17:34]) and torch.equal(scale1.k, scale.k[17:34])
    # per block: QK^T and the two byte planes of PV, batched over the block's query heads
    assert calls.count(3) == model.layers_n * blocks_per_layer * 3, calls
    acc3, scale3 = model.forward_int(ids)  # the rows' blocks too
    assert torch.equal(acc3, acc) and torch.equal(scale3.m, scale.m) and torch.equal(scale3.k, scale.k)


def test_generate_runs_the_integer_model_on_its_cache(illm_out):
    """qconvert.generate on the integer-only model: each row's greedy tokens are the argmax of the
    whole sequence run again at each step (its own prompt, unpadded, in a batch of two lengths);
    the CLI picks the integer model on the CPU and says so."""
    from transformers import AutoTokenizer

    from qconvert import load
    from qconvert.errors import QConvertError
    from qconvert.generate import generate

    model, tok = load(illm_out), AutoTokenizer.from_pretrained(illm_out)
    prompts = ["the cat sat", "a much longer prompt than the other one"]
    res = generate(model, tok, prompts, max_new_tokens=6)
    assert res.device == "cpu" and not res.graphs and res.decode_steps == 5
    for prompt, got in zip(prompts, res.token_ids):
        seq = tok(prompt, return_tensors="pt").input_ids
        want = []
        for _ in range(len(got)):
            want.append(int(model(seq).logits[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([[want[-1]]])], 1)
        assert got == want
    eng = model.decode_engine(1, 4)
    with pytest.raises(QConvertError, match="decode before prefill"):
        eng.decode(torch.tensor([1]))
    with pytest.raises(QConvertError, match="prompt of 4 tokens: the engine's max_len is 4 .* longer IntegerDecodeEngine"):
        eng.prefill(torch.ones(1, 4, dtype=torch.int64))
    with pytest.raises(QConvertError, match="prefill of 2 prompts: the engine holds 1 to 1"):
        eng.prefill(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(QConvertError, match="attention_mask must be left padding"):
        eng.prefill(torch.ones(1, 3, dtype=torch.int64), torch.tensor([[0, 0, 0]]))
    eng.prefill(torch.ones(1, 3, dtype=torch.int64))
    with pytest.raises(QConvertError, match=r"one token per row \(1\)"):
        eng.decode(torch.tensor([1, 2]))
    eng.decode(torch.tensor([1]))
    with pytest.raises(QConvertError, match="columns are full"):
        eng.decode(torch.tensor([1]))
    with pytest.raises(QConvertError, match="longer than the model's 256 positions"):
        model.decode_engine(1, 257)
    out = CliRunner().invoke(cli, ["generate", str(illm_out), "--device", "cpu", "--prompt", "the cat sat",
                                   "--max-new-tokens", "4"])
    assert out.exit_code == 0, out.output
    assert "[qconvert integer-only on cpu] prefill" in out.output


def test_the_integer_model_takes_transformers_generate_and_labels(illm_out):
    """load(OUT) of an I-LLM OUT is the integer-only model, which had neither transformers' generate
    (AttributeError) nor a loss for labels= (ignored): generate gives each left-padded row its prompt
    then the tokens qconvert.generate picks (pad after an EOS), and the loss is the mean next-token
    cross-entropy of the logits."""
    from transformers import AutoTokenizer

    from qconvert import load
    from qconvert.errors import QConvertError
    from qconvert.generate import generate

    model, tok = load(illm_out), AutoTokenizer.from_pretrained(illm_out)
    prompts = ["the cat sat", "a much longer prompt than the other one"]
    enc = [tok(p).input_ids for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    want = generate(model, tok, prompts, max_new_tokens=6).token_ids
    assert torch.equal(got[:, :width], ids)
    for row, w in zip(got[:, width:].tolist(), want):
        assert row[:len(w)] == w and set(row[len(w):]) <= {0}
    eos = want[0][2]  # stop the first row at its third token: it pads from there, the batch goes on
    cut = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert cut[0, width:width + 3].tolist() == want[0][:3] and set(cut[0, width + 3:].tolist()) <= {0}
    assert model.generate(ids[1], max_new_tokens=2).shape == (1, width + 2)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_length=width + 3, pad_token_id=0), got[:, :width + 3])
    # no attention_mask: the padding is where pad_token_id is (transformers' inference), unless that is the EOS
    repadded = torch.where(mask.bool(), ids, torch.full_like(ids, 299))
    assert torch.equal(model.generate(repadded, max_new_tokens=6, pad_token_id=299),
                       model.generate(repadded, attention_mask=mask, max_new_tokens=6, pad_token_id=299))
    assert torch.equal(model.generate(repadded, attention_mask=mask, max_new_tokens=6, pad_token_id=0)[:, width:],
                       got[:, width:])
    # transformers' stopping_criteria(ids, scores): row 1 stops after its second new token, the batch at row 0's EOS
    seen = []

    def second_token_of_row_1(all_ids, scores):
        seen.append((all_ids.shape[1], scores.shape))
        return torch.tensor([False, all_ids.shape[1] >= width + 2])

    stopped = model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0,
                             stopping_criteria=second_token_of_row_1)
    assert stopped[1, width:width + 2].tolist() == want[1][:2] and set(stopped[1, width + 2:].tolist()) <= {0}
    assert torch.equal(stopped[0], got[0, :stopped.shape[1]])
    assert seen[0] == (width + 1, (2, model.head_m.numel())) and [n for n, _ in seen] == list(range(width + 1, stopped.shape[1] + 1))
    sampled = [model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=5.0, seed=s)
               for s in (0, 0, 1)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    with pytest.raises(QConvertError, match="option num_beams=4 is not supported.*num_beams only as 1"):
        model.generate(ids, num_beams=4)
    with pytest.raises(QConvertError, match="option top_k=50 is not supported"):
        model.generate(ids, do_sample=True, top_k=50)
    # options at the value that changes nothing are taken (transformers' defaults; filters when greedy)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, num_beams=1, top_k=50,
                                      top_p=0.9, return_dict_in_generate=False), got)
    # like transformers, the ids end where the last row stopped (EOS is checked every few steps inside)
    first, alone = want[0][0], torch.tensor([enc[0]])
    early = model.generate(alone, max_new_tokens=12, eos_token_id=first)
    assert early.shape == (1, len(enc[0]) + 1) and early[0, -1] == first
    # an eos_token_id given replaces the model's EOS ids
    was, model.generation_config.eos_token_id = model.generation_config.eos_token_id, first
    assert model.generate(alone, max_new_tokens=3, eos_token_id=10**6).shape == (1, len(enc[0]) + 3)
    assert model.generate(alone, max_new_tokens=3).shape == (1, len(enc[0]) + 1)
    model.generation_config.eos_token_id = was
    # a list of criteria, one of them answering [B, 1]; the result is an ordinary tensor
    listed = model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0,
                            stopping_criteria=[lambda a, s: torch.zeros(2, 1, dtype=torch.bool),
                                               lambda a, s: a.shape[1] >= width + 2])
    assert listed.shape == (2, width + 2) and not listed.is_inference()
    listed[0, 0] = 1
    seq = ids[1:]
    out = model(seq, labels=seq)
    logits = out.logits[0]
    nll = -torch.log_softmax(logits[:-1].double(), -1).gather(1, seq[0, 1:, None]).mean()
    assert torch.allclose(out.loss.double(), nll, rtol=1e-5) and model(seq).loss is None
    masked = seq.clone()
    masked[0, :5] = -100
    nll_tail = -torch.log_softmax(logits[4:-1].double(), -1).gather(1, seq[0, 5:, None]).mean()
    assert torch.allclose(model(seq, labels=masked).loss.double(), nll_tail, rtol=1e-5)


def test_load_reads_the_outs_generation_config(illm_out, tiny_rtn_out, tmp_path):
    """load() built generation_config from config.json alone, so an EOS named only in the copied
    generation_config.json (Llama-3-Instruct's <|eot_id|>) never stopped generate; now it is read, for
    transformers' models and the integer one; a damaged file is named."""
    import shutil
    from pathlib import Path

    from qconvert import load
    from qconvert.errors import QConvertError

    for src in (illm_out, tiny_rtn_out):
        out = Path(shutil.copytree(src, tmp_path / src.name))
        assert load(out).generation_config.max_new_tokens is None
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 50], "max_new_tokens": 5}))
        config = load(out).generation_config
        assert (config.eos_token_id, config.max_new_tokens) == ([0, 50], 5)
        (out / "generation_config.json").write_text("{not json")
        with pytest.raises(QConvertError, match="generation_config.json is not a valid generation config"):
            load(out)
    model = load(illm_out)
    ids = torch.tensor([[5, 17, 33]])
    free = model.generate(ids, max_new_tokens=6, eos_token_id=10**6)
    model.generation_config.eos_token_id = [int(free[0, 4])]  # the second new token: a stop from the config
    assert model.generate(ids, max_new_tokens=6).shape[1] <= 5


def test_the_engine_runs_left_padded_rows_as_one_batch(illm_out, monkeypatch):
    """Left-padded prompts of two lengths run as one batch, the padding's columns out of attention
    and each row's positions from its first real token: each row's logits are those of its prompt
    alone, bit for bit (at prefill and at each cached step)."""
    from qconvert import load
    from qconvert.layouts.illm import IntegerLlama

    model = load(illm_out)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 300, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[1, :3] = 0
    ids[1, :3] = 0
    calls = []
    real = IntegerLlama.forward_int
    monkeypatch.setattr(IntegerLlama, "forward_int", lambda self, x, *a, **kw: calls.append(tuple(x.shape)) or real(self, x, *a, **kw))
    eng = model.decode_engine(3, 12)
    steps = [eng.prefill(ids, mask)]
    assert len(eng.cache.groups) == 1 and eng.cache.groups[0][1].pad.tolist() == [0, 3, 0] and calls == [(3, 7)]
    nxt = torch.randint(1, 300, (3, 3), generator=gen)
    calls.clear()
    for j in range(3):
        steps.append(eng.decode(nxt[:, j]))
    assert calls == [(3, 1)] * 3 and eng.cache.lengths == [10, 7, 10]
    monkeypatch.setattr(IntegerLlama, "forward_int", real)
    got = torch.stack(steps, 1)  # [3, 4, V]
    for r, p in ((0, 0), (1, 3), (2, 0)):
        alone = model.sequence_logits(torch.cat([ids[r, p:], nxt[r]]))
        assert torch.equal(got[r], alone[-4:]), r
    # without the padding's columns left out (or with positions counted from the padding) row 1 differs
    unpadded = model.sequence_logits(torch.cat([ids[1], nxt[1]]))
    assert not torch.equal(got[1], unpadded[-4:])
    # in parts (BATCH_TOKENS 2: one row at prefill, two then one at each step; the cache and its
    # padding split and joined), and in attention blocks of one row of one head: the same bits
    from qconvert.layouts import illm as illm_layout

    for key, table, value in (("cpu", illm_layout.BATCH_TOKENS, 2), ("cpu", illm_layout.ATTN_BLOCK_BYTES, 1)):
        with monkeypatch.context() as mp:
            mp.setitem(table, key, value)
            eng = model.decode_engine(3, 12)
            again = [eng.prefill(ids, mask)] + [eng.decode(nxt[:, j]) for j in range(3)]
        assert torch.equal(torch.stack(again, 1), got) and eng.cache.groups[0][1].pad.tolist() == [0, 3, 0], table


@pytest.mark.parametrize("padded", [False, True])
def test_the_captured_shape_of_a_decode_step_is_the_eager_step_without_host_syncs(illm_out, padded, monkeypatch):
    """The decode step a CUDA graph captures, run on the CPU: the new tokens written at a device
    column, attention over all max_len columns with the unfilled ones masked (here holding an
    earlier, longer batch's keys and values), every integer op branch-free.  Under the strict mock
    guard (any read of a tensor's value raises) it gives the eager step's logits bit for bit, in one
    pass and in parts of rows (BATCH_TOKENS), and its cache holds the eager cache's columns."""
    from qconvert import load
    from qconvert.engine import HostSyncError, host_sync_guard
    from qconvert.layouts import illm as illm_layout

    model = load(illm_out)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 300, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.int64)
    if padded:
        mask[1, :3] = 0
    nxt = torch.randint(1, 300, (3, 4), generator=gen)
    eager = model.decode_engine(3, 40)
    assert not eager.graphs
    want = [eager.prefill(ids, mask)] + [eager.decode(nxt[:, j]) for j in range(4)]
    assert eager._seq().pad is None if not padded else eager._seq().pad.tolist() == [0, 3, 0]
    for parts in (False, True):
        wide = model.decode_engine(3, 40)
        wide._wide = True
        first = wide.prefill(torch.randint(1, 300, (3, 20), generator=gen))  # stale columns for the batch below
        for _ in range(3):
            first = wide.decode(first.argmax(-1))
        with monkeypatch.context() as mp:
            if parts:
                mp.setitem(illm_layout.BATCH_TOKENS, "cpu", 2)  # rows 0-1, then 2, at prefill and at each step
            got = [wide.prefill(ids, mask)]
            assert wide._seq().pad.tolist() == ([0, 3, 0] if padded else [0, 0, 0])  # always masked by
            for j in range(4):
                with host_sync_guard(strict=True):
                    got.append(wide.decode(nxt[:, j]))
        assert all(torch.equal(a, b) for a, b in zip(want, got)), parts
        assert wide.length == eager.length == 11 and wide.cache.lengths == eager.cache.lengths
        for a, b in zip(eager._seq().buffers, wide._seq().buffers):
            for x, y in zip(eager._seq()._parts(a), wide._seq()._parts(b)):
                assert torch.equal(x[:, :, :11], y[:, :, :11])
        assert wide._seq().buffers[0][0][:, :, 11:23].any()  # the earlier batch's keys were there, masked
    # the eager step's syncs are there to be caught: the guard is not blind
    with pytest.raises(HostSyncError), host_sync_guard(strict=True):
        eager.decode(nxt[:, 0])


def test_the_captured_step_keeps_to_the_device(illm_out, monkeypatch):
    """What a CUDA graph captures must run on the device alone: the engine's captured step, with the
    model on the meta device (tensors without values, so any read back to the host fails), after
    a left-padded prefill: every op's operands and results are on the model's device (0-dim
    constants aside, which a launch takes as arguments) and nothing is copied from the host (by
    ``.to`` / ``copy_``, or made on the device from Python values), the online Hadamard transform's
    signs included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qconvert import load
    from qconvert.engine import host_sync_guard

    model = load(illm_out)
    assert any(getattr(blk.mlp.down_proj, "online_transform", None) is not None for blk in model.model.layers)
    model = model.to("meta")
    eng = model.decode_engine(3, 12)
    eng._wide = True
    mask = torch.ones(3, 5, dtype=torch.int64)
    mask[1, :2] = 0
    with ri.sync_free():
        eng.prefill(torch.randint(1, 300, (3, 5)), mask)

    class Host(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bad = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            copy = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)  # from the host, any size
            if any(t.device.type != "meta" and (t.dim() > 0 or copy) for t in flat):
                self.bad.append(str(func))
            return out

    made = []  # tensors made from Python values on the device: copies from the host, in C++ past the mode

    def maker(fn):
        def make(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor) and kwargs.get("device") is not None:
                made.append(fn.__name__)
            return fn(data, *args, **kwargs)
        return make

    nxt = torch.zeros(3, dtype=torch.int64, device="meta")
    for _ in range(2):
        with monkeypatch.context() as mp:
            for name in ("tensor", "as_tensor"):
                mp.setattr(torch, name, maker(getattr(torch, name)))
            with Host() as seen, host_sync_guard(strict=True):
                logits = eng.decode(nxt)
        assert seen.bad == [] and made == [] and logits.device.type == "meta" and logits.shape == (3, model.head_m.numel())


def test_a_rounded_shift_by_a_tensor_is_the_half_up_formula():
    """``rshift_round`` by per-element amounts (floor plus bit s - 1, read from 2v) against
    (v + 2^(s-1)) >> s, shifts 0 .. 62 and values up to 2^62, and at int64's ends (where that
    formula's sum would wrap) against exact Python integers."""
    gen = torch.Generator().manual_seed(11)
    v = torch.randint(-(1 << 62), 1 << 62, (50000,), generator=gen) >> torch.randint(0, 62, (50000,), generator=gen)
    s = torch.randint(0, 63, (50000,), generator=gen)
    half = torch.where(s > 0, torch.ones_like(s) << (s - 1).clamp_min(0), torch.zeros_like(s))
    assert torch.equal(ri.rshift_round(v, s), (v + half) >> s)
    rows = v.reshape(100, 500)  # a shift per row (broadcast): the other form, equal to the first
    per_row = s[:100, None]
    assert torch.equal(ri.rshift_round(rows, per_row), (rows + half[:100, None]) >> per_row)
    assert torch.equal(ri.rshift_round(rows, per_row), ri.rshift_round(rows, per_row.expand(100, 500).contiguous()))
    ends = torch.tensor([2**62, -(2**62), 2**63 - 1, -(2**63), 5, -5, 6, -6])
    by = torch.tensor([23, 23, 1, 5, 1, 1, 2, 2])
    assert ri.rshift_round(ends, by).tolist() == [(x + (1 << (y - 1))) >> y for x, y in zip(ends.tolist(), by.tolist())]


def test_the_branch_free_integer_ops_equal_the_branching_ones():
    """``reference.sync_free()`` (what CUDA runs): shifts of mixed and one-signed amounts, rows
    beyond 2^40, a == 2^15 in ``wide_matmul``, ratios of constants: the same integers."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randint(-(1 << 40), 1 << 40, (4, 9), generator=gen)
    big = v.clone()
    big[1] <<= 12  # a row above 2^40: quantize_rows shifts it down first
    a = torch.randint(-(1 << 15), (1 << 15) + 1, (5, 16), generator=gen)
    a[2, 3] = 1 << 15
    b = torch.randint(-127, 128, (16, 6), generator=gen)
    mixed = torch.randint(-8, 9, (4, 9), generator=torch.Generator().manual_seed(1))
    cases = [lambda: ri.shift(v, mixed),
             lambda: ri.shift(v, torch.randint(0, 9, (4, 1), generator=torch.Generator().manual_seed(2))),
             lambda: ri.shift(v, torch.randint(-9, 1, (1, 9), generator=torch.Generator().manual_seed(3))),
             lambda: ri.shift(v, torch.tensor([3])),
             lambda: ri.quantize_rows(big, (1 << 20) - 1),
             lambda: ri.quantize_rows(v, 127, ri.clip_int(0.75)),
             lambda: ri.wide_matmul(a, b)]

    def flat(x):
        return [x] if isinstance(x, torch.Tensor) else [x.m, x.k] if isinstance(x, ri.Dyadic) else [t for y in x for t in flat(y)]

    for i, case in enumerate(cases):
        want = flat(case())
        with ri.sync_free():
            got = flat(case())
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want)), i
    assert torch.equal(ri.wide_matmul(a.clamp(-32767, 32767), b, below_2_15=True), a.clamp(-32767, 32767) @ b)
    assert torch.equal(ri.wide_matmul(a, b), a @ b)
    # the mixed-sign shift against the two-way form it replaced; a constant denominator against a tensor one
    old = torch.where(mixed >= 0, ri.rshift_round(v, mixed.clamp_min(0)), v << (-mixed).clamp_min(0))
    assert torch.equal(ri.shift(v, mixed), old)
    for den in (127, 1, 0, (1 << 20) - 1):
        by_int, by_tensor = ri.ratio(v.abs(), den), ri.ratio(v.abs(), torch.tensor(den))
        assert torch.equal(by_int.m, by_tensor.m) and torch.equal(by_int.k, by_tensor.k), den


def test_a_batch_beyond_batch_tokens_runs_in_parts_with_the_same_bits(illm_out, monkeypatch):
    """More rows than BATCH_TOKENS takes run in parts (the cache split and joined), with the bits of
    one pass: a prefill of 5 rows of 4 tokens in parts of 2 rows, then cached steps."""
    from qconvert import load
    from qconvert.layouts import illm as illm_layout

    model = load(illm_out)
    ids = torch.randint(0, 300, (5, 7), generator=torch.Generator().manual_seed(6))
    whole = model(ids).logits
    shapes = []
    real = illm_layout.IntegerLlama.forward_int
    monkeypatch.setattr(illm_layout.IntegerLlama, "forward_int",
                        lambda self, x, *a, **kw: shapes.append(tuple(x.shape)) or real(self, x, *a, **kw))
    monkeypatch.setitem(illm_layout.BATCH_TOKENS, "cpu", 8)
    res = model(ids[:, :4], use_cache=True)
    assert shapes == [(2, 4), (2, 4), (1, 4)] and torch.equal(res.logits, whole[:, :4])
    cache = res.past_key_values
    for a in range(4, 7):
        got = model(ids[:, a:a + 1], past_key_values=cache, use_cache=True).logits
        assert torch.equal(got, whole[:, a:a + 1]), a
    assert shapes[-1] == (5, 1) and cache.lengths == [7] * 5
    assert cache.groups[0][1].blocks[0][0].shape[:3] == (5, model.kv_heads, 7)


def test_decode_benchmark_runs(illm_out, tmp_path):
    """benchmarks/illm_decode.py: cached steps against the whole sequence again, same logits."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "illm_decode.py"), str(illm_out), "--prompt", "6",
                        "--new-tokens", "3", "--json", str(tmp_path / "d.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "d.json").read_text())
    assert row["same_logits"] is True and row["scheme"] == "illm-w8a8" and row["cache_bytes"] == 2 * 8 * 2 * 2 * 32
    assert "integer KV cache" in r.stdout and "whole sequence again" in r.stdout


def test_batch_decode_benchmark_runs(illm_out, tmp_path):
    """benchmarks/illm_batch_decode.py: a row per batch size, the batch's first and last rows
    bit-identical to those rows alone."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "illm_batch_decode.py"), str(illm_out), "--prompt", "5",
                        "--steps", "3", "--batches", "3,1", "--json", str(tmp_path / "b.json")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "b.json").read_text())
    assert got["rows_equal_alone"] is True and [row["batch"] for row in got["rows"]] == [1, 3]
    assert all(row["step_s"] > 0 for row in got["rows"]) and "bit-identical to the same rows alone: True" in r.stdout


def test_held_bytes_benchmark_runs(illm_out, tmp_path):
    """benchmarks/illm_held.py: the kernels on hold less than the torch path, by about the torch
    path's int8 copy of every linear's weights (1 byte per weight)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "illm_held.py"), str(illm_out), "--json",
                        str(tmp_path / "h.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "h.json").read_text())
    held, weights = got["held_bytes"], got["linear_weights"]
    assert got["on_kernel"] == got["linears"] and weights > 0
    assert 0.9 * weights < held["torch_path"] - held["kernels"] <= weights and "kernels on" in r.stdout


def test_bench_on_the_integer_model(illm_out, tmp_path, monkeypatch):
    """`qconvert bench OUT` times an integer-only OUT's integer model on its own engine (a decode
    step of batch 2 is one batched pass), against the original, labelled so; in OUT/bench.json it
    replaces a result of the float view (what bench timed before) and the card shows its note."""
    import shutil

    from qconvert import load
    from qconvert.bench import model_speed
    from qconvert.errors import QConvertError
    from qconvert.hub import model_card
    from qconvert.layouts.illm import IntegerLlama

    out = tmp_path / "out"
    shutil.copytree(illm_out, out)
    stale = {"kind": "model", "runtime": "cpu-reference", "environment": {"device": "cpu"},
             "note": "integer-only OUT: timed as the float model with the same quantized linears", "quantized": {}}
    (out / "bench.json").write_text(json.dumps([stale]))
    shapes = []
    real = IntegerLlama.forward_int
    monkeypatch.setattr(IntegerLlama, "forward_int", lambda self, x, *a, **kw: shapes.append(tuple(x.shape)) or real(self, x, *a, **kw))
    res = CliRunner().invoke(cli, ["bench", str(out), "--device", "cpu", "--prefill", "16", "--new-tokens", "2",
                                   "--batch", "1,2", "--repeats", "1", "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    assert "integer-only OUT: its integer model" in res.output and "No GPU" not in res.output
    assert (1, 16) in shapes and (2, 1) in shapes and (1, 1) in shapes
    got = json.loads((tmp_path / "b.json").read_text())
    assert got["runtime"] == "integer-only-cpu" and list(got["modes"]) == ["eager"]
    assert [d["batch"] for d in got["quantized"]["decode"]] == [1, 2] and got["quantized"]["prefill_tokens_per_s"] > 0
    assert [r["runtime"] for r in json.loads((out / "bench.json").read_text())] == ["integer-only-cpu"]
    assert "runtime `integer-only-cpu`" in model_card(out) and "Note: integer-only OUT: its integer model" in model_card(out)
    with pytest.raises(QConvertError, match="CUDA graphs need a CUDA device"):
        model_speed(load(out), torch.device("cpu"), prefill=4, new_tokens=2, batches=(1,), graphs=True)


def test_export_refuses_with_the_reason_and_the_nearest_schemes(illm_out, tmp_path):
    """Every layer of an I-LLM OUT is refused (so no --exclude makes it exportable), with why and what exports."""
    res = CliRunner().invoke(cli, ["export", str(illm_out), "-o", str(tmp_path / "ct")])
    msg = " ".join(res.output.split())
    assert res.exit_code == 1 and "none of its 14 quantized linears can be exported" in msg, msg
    assert "integer-only runtime" in msg and "nearest exportable schemes are w8a8 (int8) and is-w4a8" in msg
    assert not (tmp_path / "ct").exists()
