"""I-LLM's integer-only model on a GPU (``load(OUT, device="cuda")``: DI-Norm, the requantizations
and DI-MatMul by the CUDA kernels, the rest torch integer ops on the GPU) against the same model on
the CPU, bit for bit.  Skipped without a GPU (benchmarks/gpu_check.sh runs it); the CPU proof of
the wiring is tests/test_illm_runtime_kernels.py (the kernels emulated)."""

from __future__ import annotations

import pytest
import torch

from qconvert_kernels.w4a8 import cuda as kcuda
from test_illm_runtime_kernels import SCHEMES, _ids, outs  # noqa: F401  (the OUTs, quantized on the CPU)

if not kcuda.available():
    pytest.skip("no CUDA device usable by cupy (sm_80+)", allow_module_level=True)


@pytest.mark.parametrize("key", list(SCHEMES))
def test_the_integer_model_on_the_gpu_equals_the_cpu(outs, key):
    from qconvert import load

    cpu = load(outs[key])
    gpu = load(outs[key], device="cuda")
    assert gpu.kernels and gpu.device.type == "cuda"
    assert all(lin.kernel for blk in gpu.model.layers for part in (blk.self_attn, blk.mlp) for lin in part.children())
    for n, seed in ((1, 0), (11, 3), (40, 4)):
        ids = _ids(n, seed)
        want_acc, want_s = cpu.forward_int(ids)
        acc, s = gpu.forward_int(ids.cuda())
        assert acc.is_cuda
        assert torch.equal(acc.cpu(), want_acc) and torch.equal(s.m.cpu(), want_s.m) and torch.equal(s.k.cpu(), want_s.k)


@pytest.mark.parametrize("graphs", [True, False])
def test_cached_decode_on_the_gpu(outs, graphs):
    """Batches of three rows (the second left-padded by 2), then two, then three again on one
    engine: prefill and cached steps, each step eager or replayed from its CUDA graph (the engine's
    default on a GPU; one graph per batch size, the first reused after the second), give each row's
    CPU logits alone."""
    from qconvert import load

    cpu = load(outs["w4a4-online"])
    gpu = load(outs["w4a4-online"], device="cuda")
    ids = torch.stack([_ids(12, s) for s in (7, 8, 9)])
    engine = gpu.decode_engine(max_batch=3, max_len=16, graphs=None if graphs else False)
    assert engine.device.type == "cuda" and engine.graphs == graphs
    for rows in (3, 2, 3):
        mask = torch.ones(rows, 8, dtype=torch.int64)
        mask[1, :2] = 0
        steps = [engine.prefill(ids[:rows, :8].cuda(), mask.cuda())]
        steps += [engine.decode(ids[:rows, j].cuda()).clone() for j in range(8, 12)]  # a graph's logits: a reused buffer
        got = torch.stack(steps, 1).cpu()  # [rows, 5, V]
        for r in range(rows):
            p = 2 if r == 1 else 0
            assert torch.equal(got[r], cpu.sequence_logits(ids[r, p:])[7 - p:12 - p]), (rows, r)
    assert sorted(engine._graph_of) == ([2, 3] if graphs else [])


def test_qconvert_generate_on_the_gpu_picks_the_cpu_tokens(outs):
    """`qconvert generate --device cuda` runs the integer-only model on the GPU (and says so); its
    greedy tokens are the CPU's."""
    from click.testing import CliRunner

    from qconvert.cli import cli

    text = {}
    for dev in ("cpu", "cuda"):
        res = CliRunner().invoke(cli, ["generate", str(outs["w8a8"]), "--device", dev, "--prompt", "the cat sat",
                                       "--max-new-tokens", "8"])
        assert res.exit_code == 0, res.output + repr(res.exception)
        assert f"[qconvert integer-only on {dev}" in res.output
        text[dev] = res.output.split("[qconvert")[0]
    assert text["cuda"] == text["cpu"]


def test_transformers_generate_on_the_gpu_equals_the_cpu(outs):
    """The integer model's transformers-style ``generate`` (prompt ids on either device, a mask, a
    stopping criterion seeing the ids on the model's device) gives the CPU's ids on the GPU."""
    from qconvert import load

    ids = torch.tensor([[0, 0, 5, 17, 33], [9, 41, 7, 3, 12]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    got = {}
    for dev in ("cpu", "cuda"):
        model = load(outs["w8a8"], device=dev)
        seen = []

        def criteria(all_ids, scores):
            seen.append(all_ids.device.type == scores.device.type == model.device.type)
            return all_ids.shape[1] >= 9

        got[dev] = model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=6, pad_token_id=0,
                                  stopping_criteria=criteria).cpu()
        assert seen and all(seen) and got[dev].shape == (2, 9)
    assert torch.equal(got["cuda"], got["cpu"])
