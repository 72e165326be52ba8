"""I-LLM's integer-only model with its CUDA kernels wired in (``IntegerLlama.use_kernels``, what
``load(OUT, device="cuda")`` turns on), run on the CPU through the lane-exact emulator of those
kernels (qconvert_kernels/illm/emulate.py: the launchers unchanged, every launch emulated): the
integer logits, their scales and the cached decode steps equal the torch integer path bit for
bit, every kernel the model should call is called, and a deliberate kernel bug changes the
logits.  tests/test_illm_gpu.py runs the same comparison on a GPU."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import quantize_tiny

from qconvert.layouts.illm import ILLMLinear, IntegerLlama
from qconvert_kernels.illm import emulate
from qconvert_kernels.illm import reference as ri

SCHEMES = {"w8a8": ("illm-w8a8", "--no-fsbr"), "w4a8": ("illm-w4a8", "--no-fsbr"),
           "w4a4-online": ("illm-w4a4", "--no-fsbr")}  # illm-w4a4: --rotate hadamard+online and act_clip 0.9


@pytest.fixture(scope="module")
def outs(tiny_calib_src, tmp_path_factory):
    root = tmp_path_factory.mktemp("illm-kernels")
    made = {}
    for key, (scheme, *extra) in SCHEMES.items():
        res = quantize_tiny(tiny_calib_src, root / key, scheme, *extra)
        assert res.exit_code == 0, res.output + repr(res.exception)
        made[key] = root / key
    return made


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))


def _on_kernels(model: IntegerLlama, ids: torch.Tensor, **emu):
    model.use_kernels(True)
    try:
        with emulate.emulating(**emu) as e:
            acc, scale = model.forward_int(ids)
    finally:
        model.use_kernels(False)
    return acc, scale, Counter(name for name, *_ in e.launches)


@pytest.mark.parametrize("key", list(SCHEMES))
def test_the_model_on_its_kernels_equals_the_torch_integer_path(outs, key):
    from qconvert import load

    model = load(outs[key])
    assert isinstance(model, IntegerLlama) and not model.kernels
    ids = _ids(11, 3)
    want_acc, want_scale = model.forward_int(ids)
    acc, scale, launches = _on_kernels(model, ids)
    assert torch.equal(acc, want_acc) and torch.equal(scale.m, want_scale.m) and torch.equal(scale.k, want_scale.k)
    layers = model.layers_n
    bits = 4 if key.startswith("w4") else 8
    # the first block's input DI-Norm, then per block: four DI-MatMuls (q/k/v joined, o_proj,
    # gate/up joined, down_proj), q, k and v each through 16 bits (and RoPE) to int8 in one launch,
    # attention, its heads aligned and requantized for o_proj, the SwiGLU, the online Hadamard
    # transform where the OUT has one, down_proj's input requantized, and two residual adds, each
    # with the DI-Norm after it (the last: the final norm)
    online = model.model.layers[0].mlp.down_proj.online_transform is not None
    matmul = "illm_dyadic_rows" if bits == 8 else "illm_matmul_w4"  # w8 above 8 rows: torch._int_mm, then its epilogue
    assert launches == Counter({matmul: 4 * layers, "illm_rmsnorm": 1,
                                "illm_requant_rows": layers, "illm_rope_requant": 3 * layers, "illm_heads_requant": layers,
                                "illm_attention": layers, "illm_swiglu": layers, "illm_residual_norm": 2 * layers,
                                **({"illm_hadamard": layers} if online else {})}), launches
    if key == "w4a4-online":
        assert model.model.layers[0].mlp.down_proj.online_transform is not None
        assert model.model.layers[0].mlp.down_proj.clip == ri.clip_int(0.9)


@pytest.mark.parametrize("budget", ["exact", "a byte less", "one byte"])
def test_attention_on_its_kernel_runs_in_blocks_that_keep_its_scratch_within_the_budget(outs, monkeypatch, budget):
    """The attention kernel's scratch is int64 [heads, t, n] per row: with the budget exactly that
    size the prefill's attention is one launch per block of the model; a byte less and it is a
    launch per block of KV heads (attention_blocks: two blocks), each within the budget; at one
    byte, a launch per KV head and query row (each with its rows of the causal mask).  The integers are the torch
    path's every time."""
    from qconvert import load
    from qconvert.layouts import illm as illm_layout

    model = load(outs["w8a8"])
    ids = _ids(11, 4)
    want_acc, _ = model.forward_int(ids)
    size = model.heads * 11 * 11 * 8  # int64, 11 query rows over 11 columns
    bytes_ = {"exact": size, "a byte less": size - 1, "one byte": 1}[budget]
    monkeypatch.setitem(illm_layout.ATTN_BLOCK_BYTES, "cpu", bytes_)  # the emulated kernels' device
    acc, _, launches = _on_kernels(model, ids)
    assert torch.equal(acc, want_acc)
    group = model.heads // model.kv_heads
    blocks = illm_layout.attention_blocks(model.kv_heads, 11, group * 11 * 8, torch.device("cpu"))
    assert len(blocks) == {"exact": 1, "a byte less": 2, "one byte": model.kv_heads * 11}[budget]
    assert launches["illm_attention"] == len(blocks) * model.layers_n, launches


def test_a_left_padded_prefill_on_the_kernel_in_blocks_of_one_row_gives_the_eager_bits(outs, monkeypatch):
    """A left-padded batch (its mask per head-row) with the attention budget at one byte: the
    kernel runs once per head-row and query row, each launch reading its slice of the mask."""
    from qconvert import load
    from qconvert.layouts import illm as illm_layout

    model = load(outs["w8a8"])
    gen = torch.Generator().manual_seed(12)
    ids = torch.randint(1, 300, (2, 5), generator=gen)
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[0, :3] = 0
    nxt = torch.randint(1, 300, (2,), generator=gen)
    eager = model.decode_engine(2, 8)
    want = [eager.prefill(ids, mask), eager.decode(nxt)]
    monkeypatch.setitem(illm_layout.ATTN_BLOCK_BYTES, "cpu", 1)
    model.use_kernels(True)
    try:
        with emulate.emulating() as emu:
            engine = model.decode_engine(2, 8)
            got = [engine.prefill(ids, mask), engine.decode(nxt)]
    finally:
        model.use_kernels(False)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # the prefill's 5 query rows and the step's one, per head-row (2 rows x KV heads) and block
    attn = sum(1 for name, *_ in emu.launches if name == "illm_attention")
    assert attn == (5 + 1) * 2 * model.kv_heads * model.layers_n, attn


def test_cached_decode_on_the_kernels_gives_the_whole_sequence_bits(outs):
    from qconvert import load

    model = load(outs["w4a8"])
    ids = torch.stack([_ids(9, 5), _ids(9, 6)])  # two rows as one batch
    whole = model(ids).logits  # torch integer ops, the whole sequences at once
    model.use_kernels(True)
    try:
        with emulate.emulating():
            engine = model.decode_engine(max_batch=2, max_len=12)
            assert engine.device == torch.device("cpu")
            steps = [engine.prefill(ids[:, :6])]
            for j in range(6, 9):
                steps.append(engine.decode(ids[:, j]))
    finally:
        model.use_kernels(False)
    assert torch.equal(torch.stack(steps, 1), whole[:, 5:9])


def test_a_batch_on_the_kernels_launches_once_per_step_and_gives_each_rows_bits(outs):
    """Three rows as one batch on the kernels: every kernel is launched as often as for one row
    (each launch takes the batch's tokens), and each row's integers are those it gets alone."""
    from qconvert import load

    model = load(outs["w4a4-online"])
    ids = torch.stack([_ids(6, s) for s in (7, 8, 9)])
    acc, scale, launches = _on_kernels(model, ids)
    one_acc, one_scale, single = _on_kernels(model, ids[0])  # 6 tokens: every DI-MatMul on the w4 GEMV
    want_acc, want_scale = model.forward_int(ids[0])
    assert torch.equal(one_acc, want_acc) and torch.equal(one_scale.m, want_scale.m) and torch.equal(one_scale.k, want_scale.k)
    def matmuls_as_one(c):  # one row (6 tokens) runs the GEMV, the batch (18) the tile kernel: one DI-MatMul each
        return Counter({name.replace("illm_gemv_", "illm_matmul_"): n for name, n in c.items()})

    assert launches["illm_matmul_w4"] == single["illm_gemv_w4"] > 0
    assert matmuls_as_one(launches) == matmuls_as_one(single) and sum(launches.values()) == 14 * model.layers_n + 1
    for r in range(3):
        want_acc, want_scale = model.forward_int(ids[r])
        assert torch.equal(acc[6 * r:6 * r + 6], want_acc) and torch.equal(scale.m[6 * r:6 * r + 6], want_scale.m)
        assert torch.equal(scale.k[6 * r:6 * r + 6], want_scale.k)


def test_the_integer_model_is_made_from_the_stored_tensors_whatever_the_dtype(outs):
    """A GPU load computes the float model in float16 by default; the integer model's constants
    (embedding and head int8 rows, norm mantissas) are still made from the stored tensors, so a
    float16 load gives the integers of a plain one."""
    from qconvert import load

    ids = _ids(11, 6)
    want, _ = load(outs["w8a8"]).forward_int(ids)
    got, _ = load(outs["w8a8"], dtype=torch.float16).forward_int(ids)
    assert torch.equal(got, want)


@pytest.mark.parametrize("mutation", ["round_down", "requant_no_clip", "attn_pv_group0", "rope_pos0", "heads_unaligned",
                                      "tk_no_kmin", "norm_stale_h", "ld_dense"])
def test_a_kernel_bug_changes_the_logits(outs, mutation):
    """The comparison can fail: a deliberate bug in the emulated kernels (a truncating shift; the
    requantization ignoring the activation clip of illm-w4a4; attention's P V summing one column
    group; RoPE at the first token's position; the heads left unaligned; DI-MatMul's row exponents
    without kmin; a norm of the residual instead of the sum; q, k, v or gate and up read as if
    their columns were dense) reaches the logits.  (This tiny model's siblings share one kmin: the
    joined DI-MatMul's per-member kmin has its own test below, with exponents moved apart.)"""
    from qconvert import load

    model = load(outs["w4a4-online"])
    ids = _ids(11, 3)
    want_acc, _ = model.forward_int(ids)
    acc, _, _ = _on_kernels(model, ids, mutations={mutation})
    assert not torch.equal(acc, want_acc)


def test_a_layer_the_kernel_cannot_take_stays_on_torch_ops(outs):
    """DI-MatMul's kernel steps K by 32: a linear with another K keeps the torch integer path."""
    from qconvert import load

    model = load(outs["w8a8"])
    q = torch.randint(-127, 128, (8, 40), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    odd = ILLMLinear("illm-w8a8", {"qweight": q, "shape": torch.tensor([8, 40]), "wm": torch.full((8,), 40000, dtype=torch.int32),
                                   "wk": torch.arange(20, 28, dtype=torch.int32), "smooth": torch.ones(40),
                                   "out_smooth": torch.ones(8)}, None)
    assert not odd.kernel_fits()
    model.model.layers[0].mlp.down_proj = odd  # (a stand-in: only use_kernels' choice is checked)
    model.use_kernels(True)
    assert not odd.kernel
    assert all(lin.kernel for blk in model.model.layers for part in (blk.self_attn, blk.mlp) for lin in part.children()
               if lin is not odd)
    model.use_kernels(False)
    assert not any(lin.kernel for blk in model.model.layers for part in (blk.self_attn, blk.mlp) for lin in part.children())


def _assert_joined(model):
    """Every block's q/k/v and gate/up joined, each member's qweight a view of its join's rows."""
    assert sorted(model._joined) == sorted((i, key) for i in range(model.layers_n) for key in ("qkv", "gate_up"))
    for (i, key), joined in model._joined.items():
        assert joined.splits == tuple(m.out_features for m in joined.members)
        start = 0
        for m in joined.members:
            assert m.qweight.untyped_storage().data_ptr() == joined.qweight.untyped_storage().data_ptr()
            assert m.qweight.data_ptr() == joined.qweight[start].data_ptr()
            start += m.out_features


def test_joined_siblings_hold_their_weights_once(outs):
    """On the kernels q/k/v and gate/up run as one DI-MatMul each: the members' weights become views
    of the joined tensor (no second copy), each member's segment its own rows, the weights' values
    unchanged; turning the kernels on again keeps the same joins (a captured graph's pointers stay
    valid), and a move of the model (``_apply``, what ``.to`` runs) makes them again where the
    tensors went."""
    from qconvert import load

    model = load(outs["w4a8"])
    before = {name: buf.clone() for name, buf in model.named_buffers() if name.endswith("qweight")}
    model.use_kernels(True)
    _assert_joined(model)
    first = dict(model._joined)
    model.use_kernels(False)
    assert all(torch.equal(buf, before[name]) for name, buf in model.named_buffers() if name.endswith("qweight"))
    model.use_kernels(True)
    assert all(j is first[key] for key, j in model._joined.items())
    model.to("cpu")  # where it is: the joins kept
    assert all(j is first[key] for key, j in model._joined.items())
    model._apply(lambda t: t.clone())  # every tensor moved to new memory, as .to(another device) does
    _assert_joined(model)  # (made again: the members view the new joins)
    assert all(j is not first[key] for key, j in model._joined.items())
    assert all(torch.equal(buf, before[name]) for name, buf in model.named_buffers() if name.endswith("qweight"))
    ids = _ids(5, 2)
    want, _ = model.use_kernels(False).forward_int(ids)
    got, _, _ = _on_kernels(model, ids)
    assert torch.equal(got, want)
    model._apply(lambda t: t.clone())  # kernels off: the stale joins are dropped, not kept on the old memory
    assert model._joined == {}


def test_the_kernels_release_the_torch_paths_copy_of_the_weights(outs):
    """With the kernels on, no linear the DI-MatMul kernel takes keeps the torch path's int8 [K, N]
    copy (the kernel reads qweight: a GPU holds the weights once); turned off, the torch path makes
    it again, the same bits.  ``model_runtime``'s order for a GPU, kernels on and then the move,
    leaves nothing behind on the host: here a move to the meta device."""
    from qconvert import load

    model = load(outs["w4a8"])
    lins = [lin for blk in model.model.layers for part in (blk.self_attn, blk.mlp) for lin in part.children()]
    copies = [lin.q8t.clone() for lin in lins]
    ids = _ids(6, 5)
    want, _ = model.forward_int(ids)
    model.use_kernels(True)
    assert all(lin.q8t is None for lin in lins)
    got, _, _ = _on_kernels(model, ids)  # (turns them off after)
    assert torch.equal(got, want) and all(lin.q8t is None for lin in lins)
    again, _ = model.forward_int(ids)
    assert torch.equal(again, want) and all(torch.equal(lin.q8t, c) for lin, c in zip(lins, copies))
    model.use_kernels(True).to("meta")
    assert all(lin.q8t is None and lin.qweight.is_meta for lin in lins)
    _assert_joined(model)
    assert all(j.qweight.is_meta and j.kmin.is_meta for j in model._joined.values())


def test_siblings_with_their_own_kmin_keep_their_bits(outs):
    """A joined DI-MatMul aligns each member's columns to that member's own smallest exponent: with
    k_proj's and up_proj's exponents moved up by one and two (their kmins then differ from q_proj's
    and gate_proj's), the kernels still give the torch path's integers, and aligning every segment
    to the first member's kmin changes them."""
    from qconvert import load

    model = load(outs["w8a8"])
    for blk in model.model.layers:
        for lin, up in ((blk.self_attn.k_proj, 1), (blk.mlp.up_proj, 2)):
            lin.wk += up
            lin.wk_min += up  # (wk_shift, the torch path's shifts, unchanged)
    assert all(int(b.self_attn.k_proj.wk_min) != int(b.self_attn.q_proj.wk_min) for b in model.model.layers)
    ids = _ids(7, 4)
    want, want_scale = model.forward_int(ids)
    got, scale, launches = _on_kernels(model, ids)
    assert torch.equal(got, want) and torch.equal(scale.k, want_scale.k)
    assert launches["illm_dyadic_rows"] + launches["illm_gemv_w8"] == 4 * model.layers_n  # the GEMV at M <= 8
    bad, _, _ = _on_kernels(model, ids, mutations={"kmin_first_segment"})
    assert not torch.equal(bad, want)


def test_kernels_on_cpu_tensors_need_the_emulator(outs):
    """Outside the emulator the kernels take GPU tensors only: a clear error, not a silent CPU run."""
    from qconvert import load

    model = load(outs["w8a8"]).use_kernels(True)
    with pytest.raises(ValueError, match="rmsnorm: all tensors must be on one CUDA device"):
        model.forward_int(_ids(4, 1))


def test_the_captured_step_on_the_kernels_gives_the_eager_steps_bits(outs):
    """The decode step a CUDA graph captures on a GPU (the new token at a device column, attention
    over all columns, branch-free ops) with every kernel the GPU runs, emulated, under the strict
    host-sync watch (no torch op reads a value back to the host: the emulator's own reads of the
    launched tensors go around torch's dispatch, which the guard of the torch-only test would see):
    the logits of the eager torch integer steps, bit for bit, with left padding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qconvert import load

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen, self.cache_copies = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"):
                self.seen.append(func._schema.name)
            self.cache_copies += func._schema.name.startswith("aten::index_copy")
            return func(*args, **(kwargs or {}))

    model = load(outs["w4a4-online"])
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 300, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :2] = 0
    nxt = torch.randint(1, 300, (2, 3), generator=gen)
    eager = model.decode_engine(2, 12)
    want = [eager.prefill(ids, mask)] + [eager.decode(nxt[:, j]) for j in range(3)]
    model.use_kernels(True)
    try:
        with emulate.emulating() as emu:
            wide = model.decode_engine(2, 12)
            wide._wide = True
            got = [wide.prefill(ids, mask)]
            reads = Reads()
            for j in range(3):
                with reads:  # (the captured shape runs under ri.sync_free itself)
                    got.append(wide.decode(nxt[:, j]))
    finally:
        model.use_kernels(False)
    assert reads.seen == []
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # the steps' keys and values went into the cache by the kernel (at the device column), not by copies
    assert reads.cache_copies == 0
    assert sum(1 for name, _, args in emu.launches if name == "illm_rope_requant" and args["col"]) == 3 * 2 * model.layers_n
    names = {name for name, *_ in emu.launches}
    assert {"illm_rope_requant", "illm_attention", "illm_heads_requant", "illm_swiglu", "illm_hadamard",
            "illm_residual_norm", "illm_rmsnorm", "illm_requant_rows"} <= names
