"""`qconvert bench` as a user calls it.  No timing is asserted: these tests check that the
command runs, labels what it measured and writes its JSON; speed figures live in
benchmarks/results/ and docs/benchmarks.md."""

import json

import pytest
import torch

from qconvert import bench as b
from helpers import run_cli
from qconvert.errors import QConvertError

SMALL = ["--prefill", "16", "--new-tokens", "3", "--batch", "1,2", "--repeats", "1"]


run = run_cli


@pytest.fixture
def out(tiny_rtn_out):
    return tiny_rtn_out


def _check_model_result(res: dict, batches=(1, 2)):
    assert res["kind"] == "model" and res["runtime"] == "cpu-reference"
    assert res["environment"]["device"].startswith("CPU")
    for side in ("quantized", "original_speed"):
        speed = res[side]
        assert speed["prefill_tokens"] == 16 and speed["prefill_tokens_per_s"] > 0
        assert [d["batch"] for d in speed["decode"]] == list(batches)
        assert all(d["tokens_per_s"] > 0 and d["new_tokens"] == 3 for d in speed["decode"])
    assert set(res["speedup"]) == {"prefill"} | {f"decode_batch{x}" for x in batches}


def test_bench_out_on_cpu_is_labelled_and_saved(out, tmp_path):
    res = run("bench", out, *SMALL, "--device", "cpu", "--json", tmp_path / "r.json")
    assert "CPU reference" in res.output and "say nothing about the kernels" in res.output
    assert "decode 3 tokens, batch 2" in res.output
    written = json.loads((tmp_path / "r.json").read_text())
    _check_model_result(written)
    saved = json.loads((out / "bench.json").read_text())
    assert saved[-1] == written
    run("bench", out, *SMALL, "--device", "cpu")  # same settings: replaces, does not pile up
    assert len(json.loads((out / "bench.json").read_text())) == 1
    # the result file does not count as a foreign file of OUT
    assert run("verify", out, "--no-compare").exit_code == 0


def test_glue_kernels_on_both_models_unless_asked_not_to(tiny_llama, monkeypatch, tmp_path):
    """On a GPU ``_speeds`` sets the norm, rope and swiglu kernels on the model it times (the original
    too), not with ``--no-norm-kernels`` / ``--no-rope-kernels`` / ``--no-swiglu-kernels``; the flags
    reach the end-to-end bench, whose result says them (and whether the engine wrote the KV cache on
    its kernel)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(b, "model_speed", lambda model, dev, graphs, budget, **kw: {"graphs": graphs})
    monkeypatch.setattr(b, "_modes", lambda dev: (True,))
    for glue in ((True, True, True), (False, True, True), (True, False, True), (True, True, False)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16)
        b._speeds(model, torch.device("cuda:0"), {}, b.Budget(None), *glue)
        for cls, on in zip(("LlamaRMSNorm", "LlamaAttention", "LlamaMLP"), glue):
            assert all(("forward" in m.__dict__) == on for m in model.modules() if type(m).__name__ == cls)
    seen = {}
    monkeypatch.setattr(b, "synthetic_bench", lambda name, **kw: seen.update(kw) or {})
    for flag, off in (("--no-norm-kernels", "norm_kernels"), ("--no-rope-kernels", "rope_kernels"),
                      ("--no-swiglu-kernels", "swiglu_kernels")):
        run("bench", "--synthetic", "smollm2-135m", flag, "--json", tmp_path / "x.json", ok=False)
        assert {k: seen[k] for k in ("norm_kernels", "rope_kernels", "swiglu_kernels")} == {
            k: k != off for k in ("norm_kernels", "rope_kernels", "swiglu_kernels")}
    monkeypatch.undo()
    res = run("bench", "--synthetic", "smollm2-135m", "--layers", "1", *SMALL, "--device", "cpu", "--json", tmp_path / "s.json")
    written = json.loads((tmp_path / "s.json").read_text())
    # no GPU: transformers' glue and index_copy_
    assert not any(written[k] for k in ("norm_kernels", "rope_kernels", "swiglu_kernels", "cache_kernel"))
    assert res.exit_code == 0


def test_bench_synthetic_on_cpu(tmp_path):
    res = run("bench", "--synthetic", "smollm2-135m", "--layers", "1", *SMALL, "--device", "cpu", "--json", tmp_path / "s.json")
    written = json.loads((tmp_path / "s.json").read_text())
    _check_model_result(written)
    assert written["target"] == "synthetic:smollm2-135m is-w4a8 (1 layers)"
    assert written["original"] == "synthetic:smollm2-135m (random float32 weights)"
    assert "synthetic:smollm2-135m" in res.output


def test_bench_synthetic_quik_twin_on_cpu(tmp_path):
    from qconvert import bench as b
    from qconvert.layouts.quik import QuikLinear

    res = run("bench", "--synthetic", "smollm2-135m", "--layers", "1", *SMALL, "--device", "cpu", "--scheme", "quik-w4a4",
              "--json", tmp_path / "s.json")
    written = json.loads((tmp_path / "s.json").read_text())
    _check_model_result(written)
    assert written["target"] == "synthetic:smollm2-135m quik-w4a4 (1 layers)"
    model, to_q = b.synthetic_models("smollm2-135m", torch.device("cpu"), layers=1, dtype=torch.float32)
    layers = {n: m for n, m in to_q(scheme="quik-w4a4").named_modules() if isinstance(m, QuikLinear)}
    assert len(layers) == 7 and layers["model.layers.0.mlp.down_proj"].layout == "quik-w8a8"
    assert layers["model.layers.0.mlp.down_proj"].outlier_idx.numel() == 96
    assert layers["model.layers.0.self_attn.q_proj"].outlier_idx.numel() == 32
    res = run("bench", "--synthetic", "smollm2-135m", "--layers", "1", *SMALL, "--device", "cpu", "--scheme", "zqfp-w4a8", ok=False)
    assert res.exit_code != 0 and "random-weight twins exist for is-w4a8, quik-w4a4, illm-w8a8" in res.output


def test_bench_synthetic_integer_only_twin_on_cpu(tmp_path):
    """--scheme illm-w8a8: the random-weight I-LLM twin is the integer-only model, timed on its own
    engine (eager), against the float model of the same shape; its logits are finite and vary."""
    from qconvert import bench as b
    from qconvert.layouts.illm import IntegerLlama

    res = run("bench", "--synthetic", "smollm2-135m", "--layers", "1", *SMALL, "--device", "cpu", "--scheme", "illm-w8a8",
              "--json", tmp_path / "s.json")
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["runtime"] == "integer-only-cpu" and list(written["modes"]) == ["eager"]
    assert "integer-only twin" in res.output and "No GPU" not in res.output
    assert written["target"] == "synthetic:smollm2-135m illm-w8a8 (1 layers)" and "integer-only twin" in written["note"]
    written["runtime"] = "cpu-reference"  # the rest as any model result
    _check_model_result(written)
    model, to_q = b.synthetic_models("smollm2-135m", torch.device("cpu"), layers=1, dtype=torch.float32)
    twin = to_q(scheme="illm-w8a8")
    assert isinstance(twin, IntegerLlama) and twin.layers_n == 1 and not twin.kernels
    assert torch.equal(twin.emb_q, b.synthetic_models("smollm2-135m", torch.device("cpu"), layers=1, dtype=torch.float32)[1](
        scheme="illm-w8a8").emb_q)  # seeded
    logits = twin(torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))).logits
    assert logits.shape == (2, 9, 49152) and torch.isfinite(logits).all() and logits.std() > 0
    # from a float16 model's weights, as on a GPU
    half = b.synthetic_models("smollm2-135m", torch.device("cpu"), layers=1, dtype=torch.float16)[1](scheme="illm-w8a8")
    assert half.emb_q.dtype == torch.int8 and half.norm_g.dtype == torch.int64
    assert torch.isfinite(half(torch.randint(0, 49152, (1, 5), generator=torch.Generator().manual_seed(1))).logits).all()


def test_synthetic_model_has_real_shapes_and_sane_outputs():
    from qconvert.layouts.int4 import W4A8Linear

    fp, to_q = b.synthetic_models("smollm2-135m", torch.device("cpu"), layers=2, dtype=torch.float32)
    assert fp.config.hidden_size == 576 and fp.config.intermediate_size == 1536 and fp.config.vocab_size == 49152
    rope = fp.model.rotary_emb.inv_freq
    assert torch.isfinite(rope).all() and float(rope[0]) == 1.0  # the rotary table kept its values
    ids = torch.arange(8)[None]
    assert torch.isfinite(fp(ids).logits).all()
    q = to_q()
    kinds = {type(m).__name__ for n, m in q.named_modules() if n.endswith("_proj")}
    assert kinds == {"W4A8Linear"}
    assert not isinstance(q.lm_head, W4A8Linear)
    assert torch.isfinite(q(ids).logits).all()


def test_kernels_on_the_cpu_are_refused_in_one_line():
    """bench --kernels --device cpu: the kernels run on cuda only, whether or not a GPU is here."""
    res = run("bench", "--kernels", "--device", "cpu", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "--device cpu: bench --kernels times the CUDA kernels, on cuda only" in res.output
    assert "`qconvert bench OUT --device cpu` times the CPU reference path" in res.output


@pytest.mark.skipif(b.gpu_available(), reason="a GPU is usable here")
def test_kernels_without_gpu_say_so():
    res = run("bench", "--kernels", ok=False)
    assert res.exit_code == 1 and "needs an NVIDIA GPU" in res.output and "--device cpu" in res.output
    assert "Traceback" not in res.output
    with pytest.raises(QConvertError, match="no usable GPU"):
        from qconvert.runtime import load

        load("does-not-matter", device="cuda")


@pytest.mark.parametrize("args,msg", [
    ((), "exactly one of OUT, --kernels or --synthetic"),
    (("--kernels", "--synthetic", "llama3-8b"), "got --kernels and --synthetic"),
    (("--kernels", "--layers", "2"), "--layers goes with --synthetic"),
    (("--synthetic", "gpt5"), "unknown; choose from llama3-8b, smollm2-135m"),
    (("--kernels", "--m", "1,x"), "not a comma-separated list"),
    (("--kernels", "--runs", "10"), "10 is not in the range x>=50"),
])
def test_usage_errors(args, msg):
    res = run("bench", *args, ok=False)
    assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output


def test_runtime_device_errors(out):
    from qconvert.runtime import load

    with pytest.raises(QConvertError, match="'tpu'"):
        load(out, device="tpu")
    with pytest.raises(QConvertError, match="not a device name"):
        load(out, device="gpu please")


def test_kernel_plot_renders(tmp_path):
    """The plot is drawn from whatever rows a result holds; these rows are made up for the
    renderer (their numbers are not measurements)."""
    pytest.importorskip("matplotlib")
    rows = []
    for m in (1, 16, 256):
        rows += [
            {"model": "llama3-8b", "shape": "q/o_proj", "N": 4096, "K": 4096, "M": m, "kernel": "w4a8-is", "vs_cublas": 2.0 / m ** 0.1},
            {"model": "llama3-8b", "shape": "q/o_proj", "N": 4096, "K": 4096, "M": m, "kernel": "w4a8-fs", "vs_cublas": 1.5 / m ** 0.1},
            {"model": "llama3-8b", "shape": "q/o_proj", "N": 4096, "K": 4096, "M": m, "kernel": "cublas-fp16", "vs_cublas": None},
        ]
    res = {"environment": {"device": "renderer test", "date": "-", "commit": "-"}, "results": rows}
    path = b.plot_kernels(res, tmp_path / "plots" / "k.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    summary = b.kernel_summary([dict(r, is_vs_fs=1.3) for r in rows if r["kernel"] == "w4a8-is"])
    assert summary["is_vs_cublas_min_M_le_16"] == pytest.approx(2.0 / 16 ** 0.1)
    assert summary["is_vs_cublas_min_M_ge_1024"] is None and summary["is_vs_fs_min_M_ge_256"] == 1.3


def test_commit_without_a_git_checkout_comes_from_the_environment(monkeypatch):
    """A tree copied to a GPU machine, with no .git or a stale one: the results name the commit
    gpu_check.sh's caller gave as $COMMIT, ahead of git's answer; without $COMMIT, git's."""
    import subprocess

    from qconvert import bench

    from pathlib import Path

    monkeypatch.delenv("COMMIT", raising=False)
    if (Path(bench.__file__).resolve().parents[1] / ".git").exists():
        assert bench._git_commit()  # a git checkout answers for itself (a copied tree, as the image suite's, has none)
        monkeypatch.setenv("COMMIT", "feed123")
        assert bench._git_commit() == "feed123"  # the caller's word first
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "not a git repository"))
    monkeypatch.setenv("COMMIT", "abc1234")
    assert bench._git_commit() == "abc1234"
    monkeypatch.delenv("COMMIT")
    assert bench._git_commit() is None


def test_sample_reps_fit_a_sample_to_about_two_ms():
    """A decode-sized launch keeps the 20 launches a sample; a 1.5 ms prefill GEMM gets 2, a
    launch longer than a sample 1 (part e of gpu_check.sh timed out on 20 x 60 such launches)."""
    assert b.sample_reps(10.0, 20) == 20
    assert b.sample_reps(150.0, 20) == 14
    assert b.sample_reps(1500.0, 20) == 2
    assert b.sample_reps(5000.0, 20) == 1
    assert b.sample_reps(0.0, 20) == 20 and b.sample_reps(10.0, 5) == 5
    # every operand set stays in the graph (the L2 never holds the next launch's operands)
    assert b.sample_reps(1500.0, 20, n_sets=3) == 3 and b.sample_reps(1500.0, 20, n_sets=64) == 20
