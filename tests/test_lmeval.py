"""`qconvert eval --tasks`: lm-evaluation-harness on qconvert's runtime, offline, with a task of our own."""

import json
import math
import sys

import pytest
import torch

from helpers import run_cli

ROWS = [  # a multiple-choice task on the text the tiny tokenizer was trained on (helpers.TEXT)
    {"q": "The quick brown fox jumps over the lazy", "choices": [" dog.", " integer."], "label": 0},
    {"q": "Quantization maps weights to a few", "choices": [" bits.", " foxes."], "label": 0},
    {"q": "Integer scales keep group partial sums in", "choices": [" the lazy dog", " int32"], "label": 1},
    {"q": "A model is read one block at a", "choices": [" shard", " time"], "label": 1},
    {"q": "and written shard by", "choices": [" shard.", " scale."], "label": 0},
]


run = run_cli


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """A YAML task over a local jsonl file, and no network for the datasets library."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    d = tmp_path / "tasks"
    d.mkdir()
    data = d / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "qconvert_tiny.yaml").write_text(
        "task: qconvert_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (d / "qconvert_gen.yaml").write_text(  # the same questions, answered by greedy generation up to a "."
        "task: qconvert_gen\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_target: "{{choices[label]}}"\n'
        "generation_kwargs:\n  until: [\".\"]\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return d


@pytest.fixture
def out(tiny_rtn_out):
    return tiny_rtn_out


def test_tasks_run_on_the_quantized_model(out, task_dir):
    pytest.importorskip("lm_eval", reason='lm-eval is not installed: pip install -e ".[test]"')
    res = run("eval", out, "--tasks", "qconvert_tiny", "--include-path", task_dir, "--num-fewshot", 0, "--json",
              "--device", "cpu")
    record = json.loads(res.stdout[res.stdout.index("{"):])
    assert record["kind"] == "qconvert" and record["harness"] == "lm-eval"  # qconvert.load's runtime, not a float model
    assert record["n-shot"] == {"qconvert_tiny": 0}
    assert record["n-samples"]["qconvert_tiny"]["effective"] == len(ROWS)
    acc = record["results"]["qconvert_tiny"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and acc * len(ROWS) == round(acc * len(ROWS))  # a fraction of the 5 questions
    # the table form, and --limit
    res = run("eval", out, "--tasks", "qconvert_tiny", "--include-path", task_dir, "--limit", 2)
    line = [ln for ln in res.stdout.splitlines() if "qconvert_tiny:" in ln][0]
    acc2 = float(line.split(" acc ")[1].split()[0])
    assert acc2 in (0.0, 0.5, 1.0)
    assert not (out / "eval.json").exists()  # perplexity results only are kept in OUT


def test_same_task_on_the_source_model(tiny_llama, task_dir):
    pytest.importorskip("lm_eval", reason='lm-eval is not installed: pip install -e ".[test]"')
    from qconvert.lmeval import run_tasks

    res = run_tasks(tiny_llama, ["qconvert_tiny"], include_path=task_dir, num_fewshot=0)
    assert res.kind == "safetensors"
    (value, stderr), = [v for k, v in res.metrics("qconvert_tiny").items() if k == "acc,none"]
    assert 0.0 <= value <= 1.0 and stderr is not None and math.isfinite(stderr)


def test_same_task_on_an_export_in_transformers(tiny_llama, task_dir, tmp_path):
    """A W4A16 export runs in transformers with the OUT's weights and no activation quantization:
    lm-eval scores it as it scores the OUT on qconvert's runtime."""
    pytest.importorskip("lm_eval", reason='lm-eval is not installed: pip install -e ".[test]"')
    from qconvert.lmeval import run_tasks

    out, ct = tmp_path / "out", tmp_path / "ct"
    run("quantize", tiny_llama, "--scheme", "w4a16-gptq", "--base", "rtn", "-g", 32, "-o", out, "-q")
    run("export", out, "-o", ct)
    native = run_tasks(out, ["qconvert_tiny"], include_path=task_dir, num_fewshot=0)
    exported = run_tasks(ct, ["qconvert_tiny"], include_path=task_dir, num_fewshot=0)
    assert (native.kind, exported.kind) == ("qconvert", "compressed-tensors")
    assert exported.metrics("qconvert_tiny") == native.metrics("qconvert_tiny")


def test_tasks_run_on_the_integer_only_model(tiny_calib_src, task_dir, tmp_path):
    """An I-LLM OUT loads as its integer-only model, which lm-eval's HFLM failed on (no tie_weights, no
    generate): both kinds of task run now, and each generate_until answer is the greedy text of
    qconvert.generate, cut at the stop string."""
    lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is not installed: pip install -e ".[test]"')
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from helpers import quantize_tiny
    from qconvert import load
    from qconvert.generate import generate
    from qconvert.lmeval import task_manager

    out = tmp_path / "illm"
    assert quantize_tiny(tiny_calib_src, out, "illm-w8a8").exit_code == 0
    res = run("eval", out, "--tasks", "qconvert_tiny,qconvert_gen", "--include-path", task_dir, "--num-fewshot", 0, "--json",
              "--device", "cpu")
    record = json.loads(res.stdout[res.stdout.index("{"):])
    assert record["kind"] == "qconvert"
    assert 0.0 <= record["results"]["qconvert_tiny"]["acc,none"] <= 1.0
    assert 0.0 <= record["results"]["qconvert_gen"]["exact_match,none"] <= 1.0
    model, tok = load(out), AutoTokenizer.from_pretrained(out)
    got = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok), tasks=["qconvert_gen"], num_fewshot=0,
                                  task_manager=task_manager(["qconvert_gen"], task_dir), log_samples=True)
    answers = {s["doc"]["q"]: s["resps"][0][0] for s in got["samples"]["qconvert_gen"]}
    assert len(answers) == len(ROWS)
    for q, answer in answers.items():
        text = generate(model, tok, q, max_new_tokens=5).text[0]
        assert answer == text.split(".")[0], (q, answer, text)


def _samples(model, tok, task_dir, batch_size):
    """lm-eval's responses per question, both tasks, at ``batch_size``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from qconvert.lmeval import task_manager

    tasks = ["qconvert_tiny", "qconvert_gen"]
    got = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size), tasks=tasks,
                                  num_fewshot=0, task_manager=task_manager(tasks, task_dir), log_samples=True)
    return {(t, s["doc"]["q"]): s["resps"] for t in tasks for s in got["samples"][t]}


@pytest.mark.parametrize("scheme", ["is-w4a8-rtn", "illm-w8a8"])
def test_batched_requests_answer_as_one_at_a_time(tiny_calib_src, task_dir, tmp_path, scheme, monkeypatch):
    """--batch-size N: lm-eval pads a batch on the right to score it and on the left (with its attention
    mask) to generate.  Every answer at batch 3 (5 questions: batches of 3 and 2 of unequal lengths) is
    the one of batch 1: the same greedy text, the same choice, log-likelihoods equal to float rounding
    (the integer-only model: exactly).  The CLI keeps the batch size, device and dtype with the scores."""
    pytest.importorskip("lm_eval", reason='lm-eval is not installed: pip install -e ".[test]"')
    from transformers import AutoTokenizer

    from helpers import quantize_tiny
    from qconvert import load

    out = tmp_path / scheme
    assert quantize_tiny(tiny_calib_src, out, scheme).exit_code == 0
    model, tok = load(out), AutoTokenizer.from_pretrained(out)
    one, three = _samples(model, tok, task_dir, 1), _samples(model, tok, task_dir, 3)
    assert one.keys() == three.keys() and len(one) == 2 * len(ROWS)
    exact = scheme.startswith("illm")
    for key, a in one.items():
        b = three[key]
        if key[0] == "qconvert_gen":
            assert a == b, (key, a, b)
            continue
        la, lb = [r[0][0] for r in a], [r[0][0] for r in b]  # each choice's log-likelihood
        assert la.index(max(la)) == lb.index(max(lb)), (key, la, lb)  # the same choice
        for x, y in zip(la, lb):
            assert x == y if exact else math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-4), (key, la, lb)
    # the CLI hands lm-eval the batch size (and float32 log-probabilities, which change nothing on the CPU)
    import functools

    from lm_eval.models import huggingface

    seen, init = [], huggingface.HFLM.__init__

    @functools.wraps(init)
    def spy(self, *a, **k):
        seen.append((k.get("batch_size"), k.get("softmax_dtype")))
        init(self, *a, **k)

    monkeypatch.setattr(huggingface.HFLM, "__init__", spy)
    res = run("eval", out, "--tasks", "qconvert_tiny", "--include-path", task_dir, "--num-fewshot", 0,
              "--batch-size", 3, "--device", "cpu", "--json")
    record = json.loads(res.stdout[res.stdout.index("{"):])
    assert seen == [(3, torch.float32)]
    assert (record["batch_size"], record["device"]) == (3, "cpu")
    assert record["dtype"] == ("integer-only" if exact else "float32")
    line = run("eval", out, "--tasks", "qconvert_tiny", "--include-path", task_dir, "--limit", 2, "--device", "cpu").stdout
    assert "(0-shot; cpu, " in line


def test_unknown_task_is_named(out, task_dir):
    pytest.importorskip("lm_eval", reason='lm-eval is not installed: pip install -e ".[test]"')
    from lm_eval.tasks import TaskManager

    from qconvert.errors import QConvertError
    from qconvert.lmeval import task_manager

    assert isinstance(task_manager(["qconvert_tiny"], task_dir), TaskManager)
    with pytest.raises(QConvertError, match="task 'no_such_task' is neither built into lm-eval nor in .*--include-path"):
        task_manager(["no_such_task"], task_dir)
    res = run("eval", out, "--tasks", "qconvert_tiny", "--include-path", task_dir / "missing", ok=False)
    assert res.exit_code != 0 and "does not exist" in res.output  # click checks the directory


def test_without_lm_eval_says_what_to_install(out, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as when not installed
    res = run("eval", out, "--tasks", "hellaswag", ok=False)
    assert res.exit_code == 1 and 'pip install "qconvert[lmeval]"' in res.output and "Traceback" not in res.output


def test_perplexity_eval_is_unchanged(out, tmp_path):
    from helpers import TEXT

    text = tmp_path / "t.raw"
    text.write_text(TEXT)
    record = json.loads(run("eval", out, "--data-file", text, "--seqlen", 32, "--max-windows", 2, "--json", "-q",
                             "--device", "cpu").stdout)
    assert record["windows"] == 2 and record["kind"] == "qconvert" and "perplexity" in record


def test_a_task_whose_dataset_cannot_be_fetched_gets_one_line(out, tmp_path):
    """Offline, a task that reads a Hub dataset not in the cache ended in a ConnectionError traceback
    (after lm-eval had loaded the model): now one line that says what to do.  In a process of its own,
    as the Hub libraries read their offline switches when imported."""
    import os
    import subprocess

    pytest.importorskip("lm_eval", reason='lm-eval is not installed: pip install -e ".[test]"')
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "hub_only.yaml").write_text(
        "task: qconvert_hub_only\ndataset_path: nobody/not-a-cached-dataset\ntest_split: test\n"
        "output_type: multiple_choice\n" 'doc_to_text: "{{q}}"\n' 'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "qconvert.cli", "eval", str(out), "--tasks", "qconvert_hub_only",
                        "--include-path", str(d), "--limit", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0 and "Traceback" not in r.stderr + r.stdout
    assert "Error: --tasks qconvert_hub_only: a dataset could not be fetched" in r.stderr + r.stdout
    assert "nobody/not-a-cached-dataset" in r.stderr + r.stdout
