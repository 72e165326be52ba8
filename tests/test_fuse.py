"""Sibling W4A8 linears run as one GEMM (qconvert/layouts/int4.py ``SiblingGEMM``,
``runtime.fuse_siblings``), proven on the CPU: the joined layer runs the real launcher with its
launches routed to the lane-exact emulator (qconvert_kernels/w4a8/emulate.py), and every member's
output must equal what it computes alone, bit for bit for w4a8-is."""

from __future__ import annotations

import pytest
import torch
from helpers import llama_sibling_groups

from qconvert.formats.packing import pack_int4
from qconvert.layouts import get_layout
from qconvert.runtime import fuse_siblings, load
from qconvert_kernels.w4a8 import cuda, emulate
from qconvert_kernels.w4a8 import reference as ref

K, G = 96, 32
WIDTHS = (136, 40, 40)  # q, k, v of a model with 3 kv groups: N not a multiple of the 128-channel tile
ALPHAS = (8, 5, 11)     # each member its own amplifier: the join folds them into the channel factors


def member_tensors(n: int, layout: str, seed: int, alpha: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, K), generator=gen, dtype=torch.int8)
    t = {"qweight": pack_int4(q), "shape": torch.tensor([n, K])}
    if layout == "w4a8-is":
        t.update(iscale=torch.randint(1, 200, (n, K // G), generator=gen, dtype=torch.int32),
                 cscale=torch.rand(n, generator=gen) * 0.01 + 1e-4, alpha_log2=torch.tensor([alpha], dtype=torch.int32))
    else:
        t.update(scales=(torch.rand((n, K // G), generator=gen) * 0.02 + 1e-4).half())
    return t


def members(layout: str, bias: bool = False):
    tensors = [member_tensors(n, layout, i, a) for i, (n, a) in enumerate(zip(WIDTHS, ALPHAS))]
    gen = torch.Generator().manual_seed(99)
    biases = [torch.randn(n, generator=gen).half() if bias else None for n in WIDTHS]
    return [get_layout(layout).module(t, b, G) for t, b in zip(tensors, biases)], tensors, biases


def activations(m: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn((m, K), generator=gen) * 3).half()


@pytest.mark.parametrize("layout", ["w4a8-is", "w4a8-fs"])
@pytest.mark.parametrize("m", [1, 5, 70])  # the decode kernel (M <= 64) and the prefill kernel
def test_joined_gemm_gives_each_member_its_own_output(layout, m):
    mods, tensors, _ = members(layout)
    assert type(mods[0]).fuse(mods)
    group = mods[0]._group
    x = activations(m, seed=m)
    with emulate.emulating(sm_count=8) as emu:
        got = [mod(x) for mod in (mods[2], mods[0], mods[1])]  # any order: the first call runs the GEMM
        assert group.launches == 1 and len(emu.launches) == (1 if m <= cuda.DECODE_MAX_M else 2)
        alone = [cuda.linear(x, cuda.prepare(layout, t, G, "cpu")) for t in tensors]
    got = [got[1], got[2], got[0]]
    pl = cuda.plan(m, group.prepared, 8)
    joined = ref.linear_reference(x, layout, group.tensors(), G, bounds=pl.split_bounds())
    start = 0
    for y, own, n in zip(got, alone, WIDTHS):
        assert y.shape == (m, n) and y.dtype == torch.float16
        # every layout: the joined layer's reference in its own split order
        assert torch.equal(y, joined[:, start:start + n])
        if layout == "w4a8-is":  # and Integer Scale: what the member gives alone, bit for bit
            assert torch.equal(y.view(torch.int16), own.view(torch.int16))
        start += n


def test_is_member_equals_its_cpu_reference():
    """The joined kernel against each member's CPU forward (the exact reference a CPU load runs)."""
    mods, tensors, biases = members("w4a8-is", bias=True)
    plain, _, _ = members("w4a8-is", bias=True)
    assert type(mods[0]).fuse(mods)
    x = activations(6, seed=3).reshape(2, 3, K)
    with emulate.emulating(sm_count=8):
        got = [mod(x) for mod in mods]
    for y, p, n in zip(got, plain, WIDTHS):
        assert y.shape == (2, 3, n)
        assert torch.equal(y.view(torch.int16), p(x).view(torch.int16))


def test_a_new_or_changed_input_runs_the_gemm_again():
    mods, _, _ = members("w4a8-is")
    type(mods[0]).fuse(mods)
    group = mods[0]._group
    x = activations(3, seed=1)
    with emulate.emulating(sm_count=8):
        q = mods[0](x)
        k = mods[1](x.clone())       # another tensor (same values): not the same input
        assert group.launches == 2
        assert torch.equal(mods[1](x.clone()), k)
        x2 = activations(3, seed=1)
        mods[0](x2)
        x2.mul_(2)                   # changed in place since q read it
        v2 = mods[2](x2)
        assert group.launches == 5
        assert torch.equal(v2, mods[2](x2.clone()))
        mods[0](x)
        assert torch.equal(mods[0](x), q)  # a member twice: runs again, same result
    assert group.launches == 8


def test_a_layer_runs_on_the_kernels_where_their_copy_was_prepared():
    """A layer (or joined group) runs the kernels on its input's device when their copy was
    prepared there (on the CPU: the emulator's runs); a copy prepared on another device (a model
    loaded on a GPU, then moved to the CPU: here a copy on the meta device) leaves the input to the
    CPU reference, with the same output."""
    import dataclasses

    alone = get_layout("w4a8-is").module(member_tensors(40, "w4a8-is", 7, 8), None, G)
    mods, _, _ = members("w4a8-is")
    plain, _, _ = members("w4a8-is")
    x = activations(3, seed=4)
    want = [alone(x)] + [p(x) for p in plain]  # unprepared and unfused: the reference path
    assert type(mods[0]).fuse(mods)
    with emulate.emulating(sm_count=8) as emu:
        alone.prepare_cuda(torch.device("cpu"))
        got = [alone(x)] + [m(x) for m in mods]
    assert len(emu.launches) == 2  # the prepared layer and the group, one launch each
    assert all(torch.equal(g.view(torch.int16), w.view(torch.int16)) for g, w in zip(got, want))
    group = mods[0]._group
    alone._prepared = dataclasses.replace(alone._prepared, wq=alone._prepared.wq.to("meta"))
    group.prepared = dataclasses.replace(group.prepared, wq=group.prepared.wq.to("meta"))
    launches = group.launches
    got = [alone(x)] + [m(x) for m in mods]  # no emulator: a launch would fail
    assert group.launches == launches
    assert all(torch.equal(g.view(torch.int16), w.view(torch.int16)) for g, w in zip(got, want))


def test_fuse_refuses_what_cannot_share_one_gemm():
    mods, _, _ = members("w4a8-is")
    other, _, _ = members("w4a8-fs")
    assert not type(mods[0]).fuse([mods[0], other[1]])         # two layouts
    wide = get_layout("w4a8-is").module(member_tensors(40, "w4a8-is", 7, 8), None, G)
    assert type(mods[0]).fuse([mods[0], mods[1]]) and not type(mods[0]).fuse([mods[1], wide])  # already fused
    hooked, _, _ = members("w4a8-is")
    hooked[1].register_forward_pre_hook(lambda mod, args: args)  # e.g. an online transform
    assert not type(hooked[0]).fuse(hooked)
    w16 = [get_layout("w4a16").module({"qweight": t["qweight"], "shape": t["shape"],
                                       "scales": torch.ones(n, K // G).half()}, None, G)
           for t, n in zip(members("w4a8-is")[1], WIDTHS)]
    assert not type(w16[0]).fuse(w16)  # weight-only: no W4A8 kernel
    assert all(m._group is None for m in hooked + w16)


def test_fused_model_logits_equal_the_unfused_reference(tiny_rtn_out):
    """A real is-w4a8 OUT: q/k/v and gate/up of every layer joined, the model's forward and the
    decode engine's prefill and steps give the reference's logits bit for bit."""
    from qconvert.engine import DecodeEngine

    plain = load(tiny_rtn_out, dtype=torch.float16)
    fused = load(tiny_rtn_out, dtype=torch.float16)
    layers = fused.config.num_hidden_layers
    assert sorted(fuse_siblings(fused)) == llama_sibling_groups(layers)
    groups = {id(m._group): m._group for m in fused.modules() if getattr(m, "_group", None) is not None}
    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad(), emulate.emulating(sm_count=8):
        a = plain(ids).logits
        b = fused(ids).logits
        assert all(g.launches == 1 for g in groups.values()) and len(groups) == 2 * layers
        assert torch.equal(a, b)
        engines = [DecodeEngine(m, max_batch=2, max_len=12) for m in (plain, fused)]
        outs = [[e.prefill(ids).clone()] for e in engines]
        nxt = outs[0][0].argmax(-1)
        for _ in range(3):
            for e, o in zip(engines, outs):
                o.append(e.decode(nxt).clone())
            nxt = outs[0][-1].argmax(-1)
    for x, y in zip(*outs):
        assert torch.equal(x, y)
    assert all(g.launches == 5 for g in groups.values())  # the forward, the prefill, 3 decode steps


def test_prepared_layers_keep_their_stored_tensors_on_the_host(tiny_rtn_out):
    """What ``load(OUT, device="cuda")`` does once it has repacked the weights for the kernels (from
    the host tensors, straight to the device): every W4A8 layer's stored tensors (the packed form the
    kernels no longer read) stay in host memory through the model's move, which takes everything
    else, so a GPU holds the weights once; the logits do not change.  The moves here: a copy of every
    tensor (as ``.to`` another device makes) and a move to the meta device."""
    from qconvert.layouts.int4 import STORED, W4A8Linear

    def stored(m):
        return [m._buffers[n] for n in STORED if m._buffers.get(n) is not None]

    plain = load(tiny_rtn_out, dtype=torch.float16)
    model = load(tiny_rtn_out, dtype=torch.float16)
    fuse_siblings(model)
    lins = [m for m in model.modules() if isinstance(m, W4A8Linear)]
    unprepared = get_layout("w4a8-is").module(member_tensors(40, "w4a8-is", 7, 8), None, G)
    unprepared.keep_stored_on_host()  # nothing prepared: nothing held back
    assert not unprepared._stored_on_host
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad(), emulate.emulating(sm_count=8):
        for m in lins:
            m.prepare_cuda(torch.device("cpu"))
            m.keep_stored_on_host()
        before = [stored(m) for m in lins]
        emb = model.get_input_embeddings().weight.data_ptr()
        model._apply(lambda t: t.clone())
        assert model.get_input_embeddings().weight.data_ptr() != emb  # the rest moved (made while the old lived)
        assert all(len(s) == len(b) >= 2 and all(x is y for x, y in zip(s, b)) for s, b in
                   zip((stored(m) for m in lins), before))
        assert torch.equal(plain(ids).logits, model(ids).logits)
    model.to("meta")
    assert model.get_input_embeddings().weight.is_meta
    assert all(t.device.type == "cpu" for m in lins for t in stored(m))
    unprepared.to("meta")
    assert all(t.is_meta for t in stored(unprepared))
