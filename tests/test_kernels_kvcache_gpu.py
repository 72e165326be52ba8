"""The KV-cache write kernel on a GPU against its reference (two index_copy_), bit for bit, and
the decode engine on a GPU writing its cache through it, captured in CUDA graphs, with the same
logits as with index_copy_ (needs cupy and an sm_80+ GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")

from qconvert_kernels.kvcache import cuda as kkv  # noqa: E402
from qconvert_kernels.kvcache import reference as ref  # noqa: E402
from qconvert_kernels.w4a8 import cuda as kcuda  # noqa: E402
from helpers import on_device  # noqa: E402
from test_kernels_kvcache import bits, kv_case  # noqa: E402

if not kcuda.available():
    pytest.skip("no CUDA device usable by cupy (sm_80+)", allow_module_level=True)

DEV = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,t,dk,dv,length,layout", [
    (1, 8, 1, 128, 128, 40, "joined"), (16, 8, 1, 128, 128, 300, "joined"), (1, 8, 2048, 128, 128, 2100, "rope"),
    (2, 3, 4, 24, 16, 9, "rope"), (3, 5, 7, 130, 130, 11, "contiguous"), (2, 2, 17, 6, 6, 17, "joined"),
])
def test_kv_write(b, h, t, dk, dv, length, layout, dtype):
    k, v, cols, kc, vc = (on_device(x, DEV) for x in kv_case(b, h, t, dk, dv, length, dtype, layout))
    want_k, want_v = kc.clone(), vc.clone()
    ref.kv_write(k, v, cols, want_k, want_v)
    kkv.kv_write(k, v, cols, kc, vc)
    assert torch.equal(bits(kc), bits(want_k)) and torch.equal(bits(vc), bits(want_v))


def test_the_engine_writes_its_cache_on_the_kernel(tiny_rtn_out, monkeypatch):
    """A GPU load of an is-w4a8 OUT decoding on graph-captured steps: the cache launches are one a
    block a forward, and the logits equal those of the same engine writing with index_copy_."""
    from qconvert import load
    from qconvert.engine import DecodeEngine

    model = load(tiny_rtn_out, device="cuda")
    ids = torch.randint(1, 300, (2, 6), generator=torch.Generator().manual_seed(3)).to(DEV)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    runs, calls = [], []
    launch = kkv.kv_write
    monkeypatch.setattr(kkv, "kv_write", lambda *a, **kw: calls.append(a) or launch(*a, **kw))
    for kernel in (False, True):
        calls.clear()
        eng = DecodeEngine(model, 2, 16, cache_kernel=kernel)
        assert eng.graphs and (eng.cache.kernel_device is not None) == kernel
        logits = [eng.prefill(ids, mask)]
        for _ in range(5):
            logits.append(eng.decode(logits[-1].argmax(-1)).clone())
        # the prefill, the warm-up step and the captured one call it (a graph replays without a call)
        assert len(calls) == (3 * model.config.num_hidden_layers if kernel else 0)
        runs.append(torch.stack(logits))
    assert DecodeEngine(model, 1, 8).cache.kernel_device == torch.device("cuda", torch.cuda.current_device())
    assert torch.equal(bits(runs[1]), bits(runs[0]))
