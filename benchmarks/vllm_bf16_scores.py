"""What vLLM's CPU build scores, in bfloat16, against qconvert's runtime: the figures behind
tests/test_vllm.py's ``W4A16_CPU_TOL`` / ``TINY_BF16_TOL`` and docs/export.md ("On an AVX-512 CPU").

    QCONVERT_VLLM_PYTHON=VENV/bin/python python benchmarks/vllm_bf16_scores.py [--json F]

VENV is vLLM's environment (.ci/vllm_env.sh).  SmolLM2 (as tests/test_vllm.py quantizes it: round to
nearest) unquantized, W4A16, W4A16 with zero points and W8A8 int8, scored by vLLM in bfloat16 on the
tests' 2 windows of 256 WikiText-2 test tokens, beside qconvert's float32 perplexity (and, for
W4A16, its bfloat16 one with eager attention); then the tests' tiny Phi-3, Gemma-2, Granite and
OLMo-2 at W4A16: the relative difference of the sums of log-probabilities; then the tests' tiny
image-text models (tests/test_vllm.py ``serve_image_text``: Gemma-3, Mistral-3, LLaVA, InternVL3,
SmolVLM2, Idefics3, Qwen2.5-VL, Qwen3-VL with their processors) at W4A16: text windows against qconvert's
runtime, a prompt with an image against transformers' float model holding the OUT's weights, and
that prompt without the image; then the tests' tiny mixture-of-experts models (``serve_moe``:
Mixtral, Qwen2-MoE, Qwen3-MoE) at W4A16 against qconvert's runtime, and the Qwen3-MoE export with
two experts' tensors swapped.  A few minutes on 2 cores; ``--image-text`` and ``--moe`` run only
their parts (about a minute each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

for _var, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2")):  # as the tests
    os.environ.setdefault(_var, _value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
WIKI_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


class _Dirs:
    """What ``tests/test_vllm.quantize_and_export`` asks of pytest's tmp_path_factory."""

    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--image-text", action="store_true", help="only the image-text models")
    ap.add_argument("--moe", action="store_true", help="only the mixture-of-experts models")
    args = ap.parse_args()
    if not os.environ.get("QCONVERT_VLLM_PYTHON"):
        sys.exit("set QCONVERT_VLLM_PYTHON to the python of vLLM's environment (.ci/vllm_env.sh VENV)")
    import torch

    import test_vllm as t
    from helpers import tiny_config, write_model
    from qconvert import load, quantize
    from qconvert.calibration_text import load_eval_text
    from qconvert.formats.compressed_tensors import export
    from qconvert.source import resolve_source

    vllm = t.VLLM_PYTHON
    only = "moe" if args.moe else "image_text" if args.image_text else None
    rows = {"smollm2": [], "tiny": [], "image_text": [], "moe": []}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for kind in t.MOE_KINDS if only != "image_text" else ():
            (d / kind).mkdir()
            found = t.serve_moe(vllm, kind, d / kind)
            res = found["result"]
            row = {"kind": kind, "ok": res["ok"], "vllm_bf16": res.get("sum_logprob"), "qconvert_f32": found["ours"]}
            if kind == "qwen3_moe" and res["ok"]:
                row["experts_0_1_swapped"] = _swapped_experts_score(t, vllm, d / kind)
            row["unquantized_bf16_vs_f32"] = _unquantized_bf16_gap(t, vllm, d / kind)
            rows["moe"].append(row)
        for kind in t.IMAGE_TEXT if only != "moe" else ():
            (d / kind).mkdir()
            found = t.serve_image_text(vllm, kind, d / kind)
            res = found["result"]
            row = {"kind": kind, "ok": res["ok"], **({"error": res["error"]} if not res["ok"] else {})}
            if res["ok"]:
                got = sum(res["images"][0]["logprobs"])
                row.update(text_vllm_bf16=res["sum_logprob"], text_qconvert_f32=found["text_ours"],
                           image_vllm_bf16=got, image_reference_f32=found["image_want"],
                           image_reference_f32_without_image=found["image_blind"], image_tokens=found["image_tokens"],
                           parts=res["parts"])
            if kind == "gemma3":
                row["float_source_f32_per_token"] = _gemma3_image_attention(t, vllm, d / kind, found["config"])
            rows["image_text"].append(row)
        if only:
            (_print_moe if only == "moe" else _print_image_text)(rows[only])
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
            return
        src = resolve_source("smollm2-135m")
        tok = src.load_tokenizer()
        text = load_eval_text("wikitext2", WIKI_TEST)[: t.TEXT_CHARS]
        request = t.write_request(d / "bf16.json", tok(text).input_ids, generate=False, dtype="bfloat16")
        state = {n: src.get(n).contiguous() for n in src.keys()}
        state.pop("lm_head.weight", None) if src.config.tie_word_embeddings else None
        fp = write_model(d / "fp", src.config, state, tokenizer=False)
        src.save_tokenizer(fp)
        cases = [("unquantized", None, None, None), ("W4A16", "w4a16-gptq", t.GROUP, None),
                 ("W4A16 zero points", "w4a16-gptq", t.GROUP, {"symmetric": False}), ("W8A8 int8", "w8a8", None, None)]
        for label, scheme, group, params in cases:
            if scheme is None:
                model_dir, runtime, out = fp, src.load_model(), None
            else:
                out, model_dir = t.quantize_and_export(src, _Dirs(d / label.replace(" ", "-")), scheme, group, params)
                runtime = load(out)
            res = t.run_vllm(vllm, model_dir, request, d)
            row = {"export": label, "vllm_ok": res["ok"], "vllm_bf16": res.get("perplexity"),
                   "qconvert_f32": t.qconvert_ppl(runtime, tok, text), **({"error": res["error"]} if not res["ok"] else {})}
            if scheme == "w4a16-gptq":
                bf = load(out, dtype=torch.bfloat16)
                bf.set_attn_implementation("eager")  # torch's bf16 SDPA needs AVX-512, which the tests' pin hides
                row["qconvert_bf16_eager"] = t.qconvert_ppl(bf, tok, text)
            rows["smollm2"].append(row)
        for arch in ("phi3", "gemma2", "granite", "olmo2"):  # as test_other_architectures_w4a16_match_qconvert
            cfg = tiny_config(arch, hidden=256, intermediate=512, heads=4, kv_heads=2, tie=arch == "gemma2")
            if arch == "gemma2":
                cfg.head_dim, cfg.query_pre_attn_scalar, cfg.sliding_window = 64, 64, 4096
            out = quantize(write_model(d / arch, cfg), "w4a16-gptq", d / f"{arch}-out", base="rtn", progress=False)
            export(out, d / f"{arch}-ct")
            ids = torch.randint(3, 300, (t.WINDOWS, 64), generator=torch.Generator().manual_seed(0))
            req = d / f"{arch}.json"
            req.write_text(json.dumps({"windows": ids.tolist(), "prompt": [], "max_new_tokens": 0, "dtype": "bfloat16"}))
            res = t.run_vllm(vllm, d / f"{arch}-ct", req, d)
            with torch.inference_mode():
                ours = t.sum_logprob(load(out)(ids).logits, ids)
            rows["tiny"].append({"arch": arch, "vllm_bf16": res.get("sum_logprob"), "qconvert_f32": ours,
                                 "rel": abs(res["sum_logprob"] - ours) / abs(ours) if res["ok"] else None})
    print("SmolLM2, perplexity on 2 x 256 WikiText-2 test tokens")
    for r in rows["smollm2"]:
        gap = f"{(r['vllm_bf16'] / r['qconvert_f32'] - 1) * 100:+.2f}%" if r["vllm_ok"] else r["error"][:80]
        extra = f"  qconvert bf16 (eager) {r['qconvert_bf16_eager']:.3f}" if "qconvert_bf16_eager" in r else ""
        print(f"  {r['export']:18} vLLM bf16 {r['vllm_bf16'] or float('nan'):8.3f}  qconvert f32 {r['qconvert_f32']:8.3f}  {gap}{extra}")
    print("tiny models, W4A16: relative difference of the sums of log-probabilities (vLLM bf16 / qconvert f32)")
    for r in rows["tiny"]:
        print(f"  {r['arch']:8} {r['rel']:.3g}" if r["rel"] is not None else f"  {r['arch']:8} vLLM failed")
    _print_image_text(rows["image_text"])
    _print_moe(rows["moe"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _swapped_experts_score(t, vllm: str, d: Path) -> float:
    """vLLM's sum of log-probabilities on the export in ``d`` with experts 0 and 1 of every block
    swapped (a mis-mapping the tests' bound must catch)."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    swapped = d / "ct-swapped"
    shutil.copytree(d / "ct", swapped)
    state = load_file(swapped / "model.safetensors")
    rename = lambda k: re.sub(r"experts\.([01])\.", lambda m: f"experts.{1 - int(m.group(1))}.", k)  # noqa: E731
    save_file({rename(k): v for k, v in state.items()}, swapped / "model.safetensors", metadata={"format": "pt"})
    res = t.run_vllm(vllm, swapped, d / "request.json", d)
    return res.get("sum_logprob")


def _unquantized_bf16_gap(t, vllm: str, d: Path) -> float | None:
    """vLLM's bfloat16 path on the unquantized source in ``d`` (serve_moe's request) against
    transformers' float32: how far bfloat16 alone moves these models' scores."""
    import torch
    from transformers import AutoModelForCausalLM

    res = t.run_vllm(vllm, d / "src", d / "request.json", d)
    if not res["ok"]:
        return None
    ids = torch.tensor(json.loads((d / "request.json").read_text())["windows"])
    with torch.inference_mode():
        want = t.sum_logprob(AutoModelForCausalLM.from_pretrained(d / "src", dtype=torch.float32).eval()(ids).logits, ids)
    return abs(res["sum_logprob"] - want) / abs(want)


def _gemma3_image_attention(t, vllm: str, d: Path, config: dict) -> dict | None:
    """The float Gemma-3 source in ``d`` with the image prompt, vLLM in float32 against transformers
    without token_type_ids (image tokens attend causally) and with them (both ways, as its
    processor's output asks): the largest per-token difference of the log-probabilities."""
    import torch

    from helpers import float_model

    request = d / "float32-image.json"
    request.write_text(json.dumps({"windows": [], "prompt": [], "max_new_tokens": 0, "dtype": "float32", "images": [
        {"prompt": [5, 17, 42, *t.image_placeholder(config), 7, 99, 23, 64], **t.tiny_image()}]}))
    res = t.run_vllm(vllm, d / "src", request, d)
    if not res["ok"]:
        return None
    served = res["images"][0]
    ids = torch.tensor([served["prompt_token_ids"]])
    inputs = t.image_inputs(config, ids, served["processed"])
    got = torch.tensor(served["logprobs"], dtype=torch.float64)
    model, found = float_model(d / "src"), {}
    for label, extra in (("causal", {}), ("token_type_ids", {"token_type_ids": (ids == t.image_token(config)).int()})):
        with torch.inference_mode():
            logp = torch.log_softmax(model(**inputs, **extra).logits.double(), dim=-1)
        found[label] = float((logp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0] - got).abs().max())
    return found


def _print_moe(rows: list[dict]) -> None:
    print("tiny mixture-of-experts models, W4A16: relative difference of the sums of log-probabilities "
          "(vLLM bf16 / qconvert f32)")
    for r in rows:
        if not r["ok"]:
            print(f"  {r['kind']:10} vLLM failed")
            continue
        rel = lambda a: abs(a - r["qconvert_f32"]) / abs(r["qconvert_f32"])  # noqa: E731
        swapped = f"   experts 0 and 1 swapped: {rel(r['experts_0_1_swapped']):.3g}" if "experts_0_1_swapped" in r else ""
        base = r.get("unquantized_bf16_vs_f32")
        base = f"   (unquantized source, vLLM bf16 / transformers f32: {base:.3g})" if base is not None else ""
        print(f"  {r['kind']:10} {rel(r['vllm_bf16']):.3g}{swapped}{base}")


def _print_image_text(rows: list[dict]) -> None:
    print("tiny image-text models, W4A16 served with their image encoders: relative differences of the sums of "
          "log-probabilities")
    print(f"  {'model':11} {'text':>9} {'image':>9} {'no image':>9} {'image tokens':>12}  image parts in vLLM")
    for r in rows:
        if not r["ok"]:
            print(f"  {r['kind']:11} vLLM failed: {r['error'][:80]}")
            continue
        rel = lambda a, b: abs(a - b) / abs(b)  # noqa: E731
        parts = ", ".join(f"{p}: {'/'.join(m)}" for p, m in r["parts"].items() if p not in ("language_model", "text_model", "lm_head"))
        print(f"  {r['kind']:11} {rel(r['text_vllm_bf16'], r['text_qconvert_f32']):9.2e} "
              f"{rel(r['image_vllm_bf16'], r['image_reference_f32']):9.2e} "
              f"{rel(r['image_reference_f32_without_image'], r['image_reference_f32']):9.2e} {r['image_tokens']:12}  {parts}")
        if r.get("float_source_f32_per_token"):
            f = r["float_source_f32_per_token"]
            print(f"  {'':11} float source, vLLM f32 vs transformers, largest per-token difference: {f['causal']:.2g} "
                  f"(image tokens causal), {f['token_type_ids']:.2g} (given token_type_ids: both ways)")


if __name__ == "__main__":
    main()
