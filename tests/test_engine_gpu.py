"""The decode engine on a CUDA GPU: the captured step against the eager one, the host-sync guard
on CUDA tensors, generation with graphs.  Skipped without a GPU (benchmarks/gpu_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch

from qconvert.engine import DecodeEngine, HostSyncError, host_sync_guard
from qconvert.errors import QConvertError
from qconvert.generate import generate
from test_engine import STEPS, _Tok, _quiet, outs  # noqa: F401  (fixtures shared with the CPU tests)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_model(which, tiny_llama, outs):
    from qconvert import load
    from transformers import AutoModelForCausalLM

    if which == "float":
        return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).to("cuda").eval()
    try:
        return load(outs[which], device="cuda")
    except QConvertError as e:  # no cupy, or a kernel this GPU lacks (fp8 needs sm_89)
        pytest.skip(str(e))


@needs_cuda
@pytest.mark.parametrize("which", ["float", "w4a8-is", "fp8-fp8", "quik-w4a4"])
def test_cuda_graph_step_equals_the_eager_step(tiny_llama, outs, which):
    """The captured decode step replays exactly the eager step of the same shapes (attention over
    all max_len columns), and stays close to the CPU-style step over the filled columns only."""
    model = _cuda_model(which, tiny_llama, outs)
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    graph, wide, narrow = (DecodeEngine(model, 4, 48, graphs=g) for g in (True, False, False))
    assert graph.graphs and not wide.graphs
    lg, lw, ln = (e.prefill(ids, mask) for e in (graph, wide, narrow))
    for _ in range(STEPS - 5):
        tok = lw.argmax(-1)
        lg = graph.decode(tok)
        wide._ids[:3].copy_(tok[:, None])
        wide.cache.seen = wide.length
        lw = wide._step(3, wide.max_len)
        wide.length += 1
        ln = narrow.decode(tok)
        assert torch.equal(lg, lw), float((lg - lw).abs().max())
        assert float((lg.float() - ln.float()).abs().max()) < 0.05 * float(ln.float().abs().max())
    assert list(graph._graph_of) == [3]


@needs_cuda
def test_cuda_guard_and_generate(tiny_llama):
    t = torch.ones(2, device="cuda")
    with host_sync_guard():
        for bad in (lambda: t.sum().item(), lambda: t.tolist(), lambda: t.cpu(), lambda: t.to("cpu"),
                    lambda: bool(t[0]), lambda: torch.cuda.synchronize()):
            with pytest.raises(HostSyncError):
                bad()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).to("cuda").eval()
    model.generation_config.eos_token_id = None
    res = generate(model, _Tok(None), ["The quick brown fox", "dog"], max_new_tokens=16)
    assert res.graphs and all(len(r) == 16 for r in res.token_ids) and res.decode_tokens_per_s > 0




@needs_cuda
def test_fused_siblings_step_equals_the_unfused_one(outs):
    """q/k/v and gate/up joined (load's default on CUDA) against one GEMM per linear, both
    captured: the same logits, bit for bit (Integer Scale; tests/test_fuse.py proves the same on the
    emulator)."""
    from qconvert import load

    try:
        fused, plain = (load(outs["w4a8-is"], device="cuda", fuse=f) for f in (True, False))
    except QConvertError as e:
        pytest.skip(str(e))
    assert any(getattr(m, "_group", None) is not None for m in fused.modules())
    assert all(getattr(m, "_group", None) is None for m in plain.modules())
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1)).cuda()
    engines = [DecodeEngine(m, 2, ids.shape[1] + STEPS, graphs=True) for m in (fused, plain)]
    a, b = (e.prefill(ids) for e in engines)
    assert torch.equal(a, b)
    for _ in range(STEPS - 5):
        tok = b.argmax(-1)
        a, b = (e.decode(tok) for e in engines)
        assert torch.equal(a, b)
