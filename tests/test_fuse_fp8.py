"""Sibling ZeroQuant-FP linears (q/k/v, gate/up) run as one GEMM (qconvert/layouts/fp8.py
``FP8Siblings``, ``runtime.fuse_siblings``), proven on the CPU: fp8-fp8 through torch's CPU
``_scaled_mm``, fp4-fp8 through the real launchers with their launches on the lane-exact emulator
(w4a8/emulate.py).  Each member's columns must be what the joined layer's reference gives (bit for
bit for the fp4-fp8 decode kernel, in the joined plan's split order) and within the FP8 tolerance of
the member's own reference."""

from __future__ import annotations

import pytest
import torch
from helpers import llama_sibling_groups, needs_cpu_row_scaled_mm, tiny_out

from qconvert.formats.fp4 import codes_to_values, unpack_fp4
from qconvert.layouts.fp8 import FP8Linear
from qconvert.methods.zeroquant_fp import ZeroQuantFPMethod
from qconvert.runtime import fuse_siblings, load
from qconvert_kernels.fp8 import cuda as cuda_fp8
from qconvert_kernels.fp8 import reference as ref8
from qconvert_kernels.w4a8 import cuda as kcuda
from qconvert_kernels.w4a8 import emulate

row_scaled_mm = needs_cpu_row_scaled_mm()  # the tests of the row-wise FP8 GEMM's paths

K = 320
WIDTHS = (136, 40, 40)  # q, k, v with 3 kv groups: N not a multiple of 16 nor of the 128-row tile
PARAMS = {"fp8-fp8": {"weight_format": "fp8", "base": "rtn", "lorc_rank": 0},
          "fp4-fp8": {"base": "rtn", "lorc_rank": 0, "group_size": 64}}


def members(layout: str, lorc_rank: int = 0, widths=WIDTHS, seed: int = 0) -> list[FP8Linear]:
    gen = torch.Generator().manual_seed(seed)
    method = ZeroQuantFPMethod({**PARAMS[layout], "lorc_rank": lorc_rank})
    mods = []
    for i, n in enumerate(widths):
        ql = method.quantize_linear(f"l{i}", torch.randn(n, K, generator=gen) * 0.05)
        assert ql.layout == layout
        mods.append(FP8Linear(ql.layout, ql.tensors, None))
    return mods


def activations(m: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn((m, K), generator=gen) * 0.5).to(dtype)


def reference(mod: FP8Linear, x: torch.Tensor, kp: int):
    """(y, |y|_abs) of one member by the reference, on the E4M3 activations padded to kp."""
    xq, t = ref8.quantize_per_token_fp8(x, kp)
    xq = xq[:, : mod.kp]
    absq = xq.float().abs().to(torch.float8_e4m3fn)
    if mod.layout == "fp8-fp8":
        return (ref8.fp8_fp8_gemm(xq, t, mod.qweight, mod.wscale),
                ref8.fp8_fp8_gemm(absq, t, mod.qweight.float().abs().to(torch.float8_e4m3fn), mod.wscale))
    w = codes_to_values(unpack_fp4(mod.qweight))
    return (ref8.fp4_fp8_gemm(xq, t, ref8.weight_groups(w, mod.group_size), mod.sexp, mod.cscale),
            ref8.fp4_fp8_gemm(absq, t, ref8.weight_groups(w.abs(), mod.group_size), mod.sexp, mod.cscale))


def within_tolerance(y, mod, x, kp, dtype) -> float:
    want, y_abs = reference(mod, x, kp)
    bound = 2.0**-9 * y_abs + torch.finfo(dtype).eps * want.abs() + torch.finfo(dtype).tiny
    return float(((y.float() - want).abs() / bound).max())


@row_scaled_mm
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 70])
def test_fp8_fp8_siblings_run_one_quantization_and_one_gemm(monkeypatch, m, dtype):
    mods = members("fp8-fp8")
    assert FP8Linear.fuse(mods)
    for mod in mods:
        mod.prepare_cuda("cpu")  # the group's, once
    group = mods[0]._group
    assert group.prepared.w8.shape == (224, K) and all(mod._prepared is None for mod in mods)
    calls = []
    real = cuda_fp8.fp8_fp8_scaled
    monkeypatch.setattr(cuda_fp8, "fp8_fp8_scaled", lambda *a: calls.append(a[0].shape) or real(*a))
    x = activations(m, dtype, seed=m)
    got = [mod(x) for mod in (mods[2], mods[0], mods[1])]  # any order: the first call runs the GEMM
    assert group.launches == 1 and calls == [(m, K)]
    for y, mod in zip([got[1], got[2], got[0]], mods):
        assert y.shape == (m, mod.out_features) and y.dtype == dtype
        assert within_tolerance(y, mod, x, K, dtype) <= 1.0


def test_fp8_fuse_refuses_what_cannot_share_one_gemm():
    fp8, fp4 = members("fp8-fp8"), members("fp4-fp8")
    assert not FP8Linear.fuse([fp8[0], fp4[1]])                          # two layouts
    assert not FP8Linear.fuse(members("fp4-fp8", lorc_rank=11))          # ranks 33 > the decode kernel's 32
    other_g = FP8Linear("fp4-fp8", ZeroQuantFPMethod({**PARAMS["fp4-fp8"], "group_size": 32}).quantize_linear(
        "g", torch.randn(40, K) * 0.05).tensors, None)
    assert not FP8Linear.fuse([fp4[0], other_g])                         # two group sizes
    hooked = members("fp8-fp8")
    hooked[1].register_forward_pre_hook(lambda mod, args: args)
    assert not FP8Linear.fuse(hooked)
    assert FP8Linear.fuse(fp8[:2]) and not FP8Linear.fuse(fp8[1:])       # already fused
    assert all(m._group is None for m in fp4 + hooked + [other_g])


def test_a_group_without_a_row_wise_gemm_leaves_its_members_on_their_own_paths(monkeypatch):
    """No row-wise FP8 GEMM in torch: the group prepares nothing (tried once per device, not again at
    every call), nothing is held on the host, and each member runs the CPU path."""
    mods = members("fp8-fp8")
    plain = members("fp8-fp8")
    assert FP8Linear.fuse(mods)

    def refuse(*a, **kw):
        raise RuntimeError("rowwise scaling is not supported here")

    probes = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: probes.append(1) or refuse())
    monkeypatch.setattr(cuda_fp8, "_SCALED_MM_OUT", {})
    for mod in mods:
        mod.prepare_cuda("cpu")
        mod.keep_stored_on_host()
    assert mods[0]._group.prepared is None and not any(mod._stored_on_host for mod in mods) and probes
    tried = len(probes)
    for mod in mods:
        mod.prepare_cuda("cpu")  # as every forward on a GPU asks: not probed again
    assert len(probes) == tried
    x = activations(3).float()
    assert all(torch.equal(mod(x), p(x)) for mod, p in zip(mods, plain))


@row_scaled_mm
def test_fused_members_keep_their_stored_tensors_on_the_host():
    mods = members("fp4-fp8")
    assert FP8Linear.fuse(mods)
    held = []
    for mod in mods:
        mod.prepare_cuda("cpu")
        mod.keep_stored_on_host()
        held.append({name: getattr(mod, name) for name in ("qweight", "sexp", "cscale")})
    for mod, h in zip(mods, held):
        assert mod._stored_on_host
        mod.to(torch.float64)
        assert all(getattr(mod, name) is h[name] for name in h)


@pytest.fixture(scope="module")
def zqfp_w8a8_out(tiny_llama, tmp_path_factory):
    return tiny_out(tiny_llama, tmp_path_factory, "zqfp-w8a8")


@row_scaled_mm
def test_fused_fp8_model_matches_the_cpu_path(zqfp_w8a8_out):
    """A real zqfp-w8a8 OUT loaded, q/k/v and gate/up of every layer joined and prepared (the CPU
    _scaled_mm standing in): one GEMM per group per forward, logits within 1e-2 of the CPU path's."""
    plain = load(zqfp_w8a8_out, dtype=torch.float16)
    fused = load(zqfp_w8a8_out, dtype=torch.float16)
    assert sorted(fuse_siblings(fused)) == llama_sibling_groups(fused.config.num_hidden_layers)
    layers = fused.config.num_hidden_layers
    for mod in fused.modules():
        if isinstance(mod, FP8Linear):
            mod.prepare_cuda("cpu")
    groups = {id(m._group): m._group for m in fused.modules() if getattr(m, "_group", None) is not None}
    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        a = plain(ids).logits.float()
        b = fused(ids).logits.float()
    assert len(groups) == 2 * layers and all(g.launches == 1 for g in groups.values())
    assert float((a - b).norm() / a.norm()) < 1e-2


def within_tolerance_lorc(y, mod, x, kp, dtype) -> float:
    """As ``within_tolerance``, the member's own LoRC term added to its reference (and to |y|_abs)."""
    want, y_abs = reference(mod, x, kp)
    xq, t = ref8.quantize_per_token_fp8(x, kp)
    z = ref8.lorc_term(xq, t, mod.lorc_u, mod.lorc_v)
    bound = 2.0**-9 * (y_abs + z.abs()) + 2 * torch.finfo(dtype).eps * (want + z).abs() + torch.finfo(dtype).tiny
    return float(((y.float() - want - z).abs() / bound).max())


@pytest.mark.parametrize("lorc_rank", [0, 8])
@pytest.mark.parametrize("m", [3, 70])  # the decode kernel (M <= 64) and the widened prefill
@row_scaled_mm
def test_fp4_fp8_siblings_run_one_launch(m, lorc_rank):
    """q/k/v joined, without LoRC and with rank 8 each (the zqfp-w4a8 preset): at decode one decode
    launch (with LoRC one h launch before it, the epilogue adding the block-diagonal term), the
    joined reference bit for bit, each member's rows of h its own; above 64 tokens one widening (LoRC
    in torch); every member within tolerance of its own reference (plus its own term)."""
    mods = members("fp4-fp8", lorc_rank=lorc_rank)
    assert FP8Linear.fuse(mods)
    group = mods[0]._group
    x = activations(m, seed=m)
    with emulate.emulating(sm_count=8) as emu:
        for mod in mods:
            mod.prepare_cuda("cpu")
        got = [mod(x) for mod in mods]
    assert group.launches == 1
    decode = ["w4a8r_lorc_h_zq", "w4a8r_decode_zq_m8"] if lorc_rank else ["w4a8r_decode_zq_m8"]
    assert [n for n, *_ in emu.launches] == (decode if m <= 64 else ["w4a8r_widen_zq"])
    xq, t = ref8.quantize_per_token_fp8(x, K)
    if lorc_rank:
        u, v = group.lorc()
        assert u.shape == (sum(WIDTHS), 24) and v.shape == (24, K)
        h = ref8.lorc_h_lanes(xq, t, v)
        for i, mod in enumerate(mods):  # each member's rows of h are what it makes alone
            assert torch.equal(h[:, 8 * i:8 * i + 8], ref8.lorc_h_lanes(xq, t, mod.lorc_v))
    if m <= 64:  # the joined layer's reference in the joined plan's split order, bit for bit
        joined = group.tensors()
        wg = ref8.weight_groups(codes_to_values(unpack_fp4(joined["qweight"])), 64)
        want = ref8.fp4_fp8_gemm_split(xq, t, wg, joined["sexp"], joined["cscale"],
                                       kcuda.plan(m, group.prepared, 8).split_bounds())
        want = (ref8.lorc_tail(want, h, u) if lorc_rank else want).half()
        assert torch.equal(torch.cat(got, 1).view(torch.int16), want.view(torch.int16))
    for y, mod in zip(got, mods):
        assert y.shape == (m, mod.out_features)
        if lorc_rank:
            assert within_tolerance_lorc(y, mod, x, group.prepared.kq, torch.float16) <= 1.0
            assert within_tolerance(y, mod, x, group.prepared.kq, torch.float16) > 1.0  # the term is there
        else:
            assert within_tolerance(y, mod, x, group.prepared.kq, torch.float16) <= 1.0


@row_scaled_mm
def test_fp8_fp8_siblings_with_lorc():
    mods = members("fp8-fp8", lorc_rank=4)
    assert FP8Linear.fuse(mods)
    x = activations(5, seed=2)
    for mod in mods:
        mod.prepare_cuda("cpu")
    got = [mod(x) for mod in mods]
    assert mods[0]._group.launches == 1
    for y, mod in zip(got, mods):
        assert within_tolerance_lorc(y, mod, x, K, torch.float16) <= 1.0
        assert within_tolerance(y, mod, x, K, torch.float16) > 1.0  # the term is there


@row_scaled_mm
def test_fused_prepared_model_decodes_without_a_host_sync(zqfp_w8a8_out):
    """The decode engine on a fused, prepared zqfp-w8a8 model (its GEMMs torch's CPU _scaled_mm): every
    decode step under the strict host-sync guard (a read of a device value to the host raises), the
    groups launched once per step, the logits within 1e-2 of the unfused CPU path's."""
    from qconvert.engine import DecodeEngine, host_sync_guard

    plain = load(zqfp_w8a8_out, dtype=torch.float16)
    fused = load(zqfp_w8a8_out, dtype=torch.float16)
    fuse_siblings(fused)
    for mod in fused.modules():
        if isinstance(mod, FP8Linear):
            mod.prepare_cuda("cpu")
    groups = {id(m._group): m._group for m in fused.modules() if getattr(m, "_group", None) is not None}
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    engines = [DecodeEngine(m, max_batch=1, max_len=12) for m in (plain, fused)]
    with torch.no_grad():
        logits = [e.prefill(ids) for e in engines]
        for _ in range(3):
            tok = logits[0].argmax(-1)
            logits[0] = engines[0].decode(tok)
            with host_sync_guard(strict=True):
                logits[1] = engines[1].decode(tok)
            a, b = (lg.float() for lg in logits)
            assert float((a - b).norm() / a.norm()) < 1e-2
    assert all(g.launches == 4 for g in groups.values())  # the prefill and 3 steps


def test_a_fused_member_without_a_row_wise_output_runs_the_first_kernel_on_its_group_rows(monkeypatch):
    """A torch whose row-wise GEMM outputs bf16 only: a fused fp8-fp8 group is prepared (stored tensors
    held on the host), fp16 activations leave the group to each member, whose fp8_gemm.cu kernel reads
    that member's rows of the group's copy (here on the fp8 emulator): its reference within tolerance."""
    from qconvert_kernels.fp8 import emulate as emulate8

    monkeypatch.setattr(cuda_fp8, "_SCALED_MM_OUT", {"cpu": {torch.float16: None, torch.bfloat16: torch.bfloat16}})
    monkeypatch.setattr(cuda_fp8, "_capability", lambda index=0: 90)
    mods = members("fp8-fp8")
    assert FP8Linear.fuse(mods)
    for mod in mods:
        mod.prepare_cuda("cpu")
        mod.keep_stored_on_host()
    group = mods[0]._group
    assert all(mod._stored_on_host for mod in mods)
    x = activations(5)
    xq, t = ref8.quantize_per_token_fp8(x, K)
    for mod in mods:
        w, ws = mod._fp8_weights(torch.device("cpu"))
        a, b = group.columns[id(mod)]
        assert w.data_ptr() == group.prepared.w8[a].data_ptr() and w.shape == mod.qweight.shape
        with emulate8.emulating():
            y = cuda_fp8.fp8_fp8_gemm(xq, t, w, ws, torch.float16)
        assert within_tolerance(y, mod, x, K, torch.float16) <= 1.0
