"""lm-evaluation-harness tasks on qconvert's runtime (``qconvert eval OUT --tasks ...``).

The model is the one ``qconvert eval`` measures perplexity with: an OUT through
``qconvert.load`` (its quantized linears run the exact integer reference), any other TARGET
as an unquantized SOURCE.  lm-eval receives it as a ready ``transformers`` model through its
``HFLM`` wrapper, so every task type it supports (loglikelihood, multiple choice, rolling
perplexity, generation) runs unchanged.  lm-eval is an optional extra:
``pip install "qconvert[lmeval]"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qconvert.errors import QConvertError, first_line

INSTALL_HINT = 'pip install "qconvert[lmeval]"'


@dataclass
class TaskResults:
    target: str
    kind: str  # "qconvert" for an OUT, else the source kind
    tasks: dict[str, dict]  # lm-eval's results[task]: {"acc,none": ..., "acc_stderr,none": ..., "alias": ...}
    n_shot: dict[str, int]
    n_samples: dict[str, dict]  # {"original": n, "effective": n} per task
    limit: int | float | None
    lm_eval_version: str | None
    runtime: dict = field(default_factory=dict)  # device, dtype (evaluate.runtime_label) and batch_size

    def to_dict(self):
        return {"target": self.target, "kind": self.kind, "harness": "lm-eval", "lm_eval_version": self.lm_eval_version,
                "limit": self.limit, "n-shot": self.n_shot, "n-samples": self.n_samples, **self.runtime,
                "results": self.tasks}

    def metrics(self, task: str) -> dict[str, tuple[float, float | None]]:
        """{metric (with its filter, e.g. "acc,none"): (value, stderr or None)} of one task."""
        out = {}
        for key, value in self.tasks[task].items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            err = self.tasks[task].get(f"{name}_stderr,{filt}")
            out[key] = (float(value), float(err) if isinstance(err, (int, float)) else None)
        return out


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise QConvertError(f"--tasks runs lm-evaluation-harness, which is not installed ({e}); {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: list[str], include_path: str | Path | None):
    """lm-eval's task index; only the --include-path directory when it holds every task
    asked for (indexing lm-eval's own few thousand YAML files takes many seconds)."""
    _, _, TaskManager = _import_lm_eval()
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise QConvertError(f"--include-path {include_path} is not a directory; give the directory of your task YAML files")
        tm = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    tm = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        where = f"neither built into lm-eval nor in {include_path}" if include_path is not None else "not built into lm-eval"
        raise QConvertError(
            f"task {unknown[0]!r} is {where}: list lm-eval's tasks with `lm-eval ls tasks`, "
            "or put your own task YAML in a directory and pass --include-path DIR"
        )
    return tm


def _network_error(e: BaseException) -> bool:
    """A failure to reach the Hub: Python's ConnectionError (datasets' "Couldn't reach", huggingface_hub's
    offline mode) or a connection / timeout error of requests, httpx or urllib3 (not all of them subclass it)."""
    for c in type(e).__mro__:
        if c is ConnectionError or (c.__module__.split(".")[0] in ("requests", "httpx", "urllib3")
                                    and ("Connect" in c.__name__ or "Timeout" in c.__name__)):
            return True
    return False


def _float32_softmax(HFLM) -> dict:
    """HFLM's ``softmax_dtype=torch.float32`` where it has the option (0.4.13 has; older ones may not): a
    float16 model's log-probabilities and their sums over a continuation are then taken in float32, as
    on the CPU, so close choices are not decided by float16 rounding."""
    import inspect

    import torch

    return {"softmax_dtype": torch.float32} if "softmax_dtype" in inspect.signature(HFLM.__init__).parameters else {}


def run_tasks(target: str | Path, tasks: list[str], limit: int | float | None = None, num_fewshot: int | None = None,
              include_path: str | Path | None = None, batch_size: int = 1, device: str | None = "cpu",
              note=None) -> TaskResults:
    """Run lm-eval ``tasks`` on TARGET (an OUT, a compressed-tensors export or any SOURCE) on ``device``
    (on "cuda" in float16 through the OUT's kernels, on the CPU in float32; None: a GPU where one is
    usable and TARGET runs there, ``note`` saying why not), ``batch_size`` requests at a time (lm-eval
    pads a batch on the right to score it, and on the left, with its attention mask, to generate)."""
    lm_eval, HFLM, _ = _import_lm_eval()
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise QConvertError("--tasks is empty; name one or more lm-eval tasks, e.g. --tasks hellaswag,arc_easy")
    tm = task_manager(tasks, include_path)  # before the model: a typo fails fast

    from qconvert.evaluate import load_where_asked, runtime_label

    model, tok, kind, _, dtype = load_where_asked(str(target), device, "qconvert eval TARGET", note)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, **_float32_softmax(HFLM))
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                      log_samples=False)
    except Exception as e:  # noqa: BLE001 - only a network failure is turned into a message
        if not _network_error(e):
            raise
        raise QConvertError(
            f"--tasks {','.join(tasks)}: a dataset could not be fetched ({first_line(e)}); "
            "run once with network access so it lands in the datasets cache (HF_DATASETS_CACHE), or give a task "
            "of your own that reads local files with --include-path DIR") from e
    if res is None:  # only on non-zero ranks of a distributed run, which this never is
        raise QConvertError("lm-eval returned no results")
    return TaskResults(str(target), kind, res["results"], dict(res.get("n-shot", {})), dict(res.get("n-samples", {})),
                       limit, res.get("lm_eval_version"), {**runtime_label(model, dtype), "batch_size": batch_size})
