"""Tiny models and data that tests build for themselves."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from qconvert.formats.safetensors_io import write_safetensors

TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps weights to a few bits. "
    "Integer scales keep group partial sums in int32 and convert to float once. "
    "A model is read one block at a time and written shard by shard. "
) * 20

ARCH = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    # Phi-3's own pad id (32000) is past a tiny vocabulary
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Gemma's default head_dim is 256; a sliding window shorter than the tests' 32-token samples, so
    # that the sliding layers' mask differs from the global layers'
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=8),
    "gemma3_text": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16,
                        query_pre_attn_scalar=16, sliding_window=8),
    # Granite-3's multipliers (its 8B's embedding, residual and logit figures; the attention scale
    # 1/16 rather than the 1/sqrt(head_dim) = 1/4 a Llama would take)
    "granite": dict(model_type="granite", architectures=["GraniteForCausalLM"], embedding_multiplier=12.0,
                    residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=16.0),
    "olmo2": dict(model_type="olmo2", architectures=["Olmo2ForCausalLM"], eos_token_id=2),  # its own: past this vocabulary
}


def tiny_config(model_type="llama", hidden=64, layers=2, intermediate=160, vocab=300, heads=4, kv_heads=2, tie=False):
    from transformers import AutoConfig

    extra = {k: v for k, v in ARCH[model_type].items() if k != "model_type"}
    if model_type == "gemma3_text":  # sliding and global layers, whatever the count (its default: 5 to 1)
        extra["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return AutoConfig.for_model(
        model_type, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=256, tie_word_embeddings=tie, **extra,
    )


def deterministic_tensor(shape, seed: int, scale: float = 0.05) -> torch.Tensor:
    """Platform-independent pseudo-random float32 values (integer LCG, one exact division)."""
    n = 1
    for d in shape:
        n *= d
    i = torch.arange(n, dtype=torch.int64)
    v = (i * 1103515245 + 12345 + seed * 2654435761) % 2147483648
    v = (v // 65536) % 2001 - 1000  # integers in [-1000, 1000]
    return (v.to(torch.float32) / 1000.0 * scale).reshape(shape)


def write_model(directory: Path, config, state: dict[str, torch.Tensor] | None = None, shards: int = 1,
                tokenizer: bool = True, dtype=torch.float32) -> Path:
    """Write config + weights (random if ``state`` is None) + tokenizer as a HF directory."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state is None:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
    config.save_pretrained(directory)
    names = list(state)
    if shards == 1:
        write_safetensors(directory / "model.safetensors", state)
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[s * per : (s + 1) * per]}
            write_safetensors(directory / fname, part)
            weight_map.update({n: fname for n in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        tiny_tokenizer(config.vocab_size).save_pretrained(directory)
    return directory


def tiny_tokenizer(vocab_size: int):
    """A byte-level BPE trained on TEXT, at most ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def golden_state(config) -> dict[str, torch.Tensor]:
    """Deterministic weights for every parameter of ``config``'s model."""
    from qconvert.skeleton import build_skeleton

    skel = build_skeleton(config)
    state = {}
    for i, (name, p) in enumerate(skel.named_parameters()):
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape) + deterministic_tensor(p.shape, i, 0.1)
        else:
            state[name] = deterministic_tensor(p.shape, i)
    return state


MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    # layer 1 is dense (mlp_only_layers): a plain mlp.gate_proj beside the MoE blocks' routers
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, shared_expert_intermediate_size=128,
                      decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False),
    # Qwen3-30B-A3B's kind: q/k norms, no shared expert, top-k weights renormalized; layer 1 dense here too
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, decoder_sparse_step=1,
                      mlp_only_layers=[1], norm_topk_prob=True, head_dim=16),
}


def tiny_moe_config(kind="mixtral", hidden=64, layers=2, intermediate=96, vocab=300, heads=4, kv_heads=2,
                    init_std=0.02):
    """A tiny Mixtral (4 experts, top-2), Qwen2-MoE (4 experts, top-2, shared expert) or Qwen3-MoE
    (4 experts, top-2) config."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        kind, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=init_std, **MOE[kind],
    )


def save_pretrained_model(directory: Path, config, seed: int = 0, dtype=torch.float32, tokenizer: bool = False) -> Path:
    """A random model of ``config`` written by transformers' own ``save_pretrained`` (its on-disk names)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(directory)
    if tokenizer:
        tiny_tokenizer(config.vocab_size).save_pretrained(directory)
    return Path(directory)


def run_cli(*args, ok=True):
    """``qconvert ARGS`` through click's CliRunner; with ``ok`` the exit code must be 0."""
    from click.testing import CliRunner

    from qconvert.cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def text_files(d: Path) -> Path:
    """``d`` with TEXT as ``calib.txt`` (what ``quantize_tiny`` calibrates on) and ``text.raw``
    (what ``check_tiny_out`` and ``eval_tiny`` read)."""
    (d / "calib.txt").write_text(TEXT)
    (d / "text.raw").write_text(TEXT)
    return d


def cli_ok(res):
    """A CliRunner result that must have succeeded (its output and exception in the message)."""
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def eval_tiny(path, text) -> dict:
    """``qconvert eval PATH --json`` on 3 windows of 32 tokens of the file ``text``."""
    return json.loads(run_cli("eval", path, "--data-file", text, "--seqlen", 32, "--max-windows", 3, "--json", "-q",
                              "--device", "cpu").stdout)


def check_tiny_out(out: Path, src: Path, text: Path) -> None:
    """A tiny OUT as its users run it: verify against ``src`` (whole and streamed), eval within
    1.5x the float model's perplexity, and generate on the decode engine."""
    import math

    for stream in ("--no-stream", "--stream"):
        run_cli("verify", out, "--data-file", text, stream)
    q, f = eval_tiny(out, text), eval_tiny(src, text)
    assert math.isfinite(q["perplexity"]) and q["perplexity"] <= 1.5 * f["perplexity"], (q, f)
    res = run_cli("generate", out, "--prompt", "hello world", "--max-new-tokens", 3, "--device", "cpu")
    assert "prefill" in res.output


def check_export_scores_as_runtime(src: Path, tmp_path: Path, text: Path | None = None) -> tuple[Path, Path]:
    """w4a16-gptq of ``src`` exported to compressed-tensors: transformers scores the export as
    qconvert's runtime scores the OUT (``eval_tiny`` on ``text``, by default ``src/../text.raw``),
    within 1e-5.  Returns (OUT, the export)."""
    needs_compressed_tensors()
    out, dest, text = tmp_path / "out", tmp_path / "ct", text or src.parent / "text.raw"
    cli_ok(quantize_tiny(src, out, "w4a16-gptq"))
    run_cli("export", out, "-o", dest)
    c, q = eval_tiny(dest, text), eval_tiny(out, text)
    assert c["kind"] == "compressed-tensors" and abs(c["perplexity"] - q["perplexity"]) <= 1e-5 * q["perplexity"], (c, q)
    return out, dest


def check_illm_refused(src: Path, tmp_path: Path) -> None:
    """An I-LLM scheme refuses ``src`` before any work: no OUT appears."""
    res = quantize_tiny(src, tmp_path / "out", "illm-w8a8")
    assert res.exit_code != 0 and "I-LLM's integer runtime runs Llama-style models" in res.output
    assert not (tmp_path / "out").exists()


def quantize_tiny(src: Path, out: Path, scheme: str, *extra):
    """``qconvert quantize`` of a tiny model calibrated on 4 x 32 tokens of ``src/../calib.txt``
    (the fixture ``tiny_calib_src``); returns the CliRunner result."""
    from click.testing import CliRunner

    from qconvert.cli import cli

    args = ["quantize", str(src), "--scheme", scheme, "-o", str(out), "-q", "--calib", "file", "--data-file",
            str(src.parent / "calib.txt"), "--nsamples", "4", "--seqlen", "32", *map(str, extra)]
    return CliRunner().invoke(cli, args)


def assert_mutation_caught(runner, args, mutation: str, expected: str, error: type) -> None:
    """A deliberate kernel bug (an emulator ``mutation``) must be caught: ``expected`` "error" (one
    of the emulator's checks raises ``error``) or "differs" (the result differs from the reference)."""
    import pytest

    if expected == "error":
        with pytest.raises(error):
            runner(*args, mutations=frozenset({mutation}))
    else:
        with pytest.raises(AssertionError, match="differs"):
            runner(*args, mutations=frozenset({mutation}))


def kernel_ops(path, arch: str) -> dict:
    """{kernel: (opcodes with their modifiers, counts by base opcode)} of the cubin the launcher
    loads for ``arch`` (NVRTC, the launch options); the test is skipped without NVRTC / cuobjdump."""
    import collections

    import pytest

    from qconvert_kernels import compile as kc
    from qconvert_kernels import launch

    if not kc.nvrtc_available() or kc.cuobjdump_path() is None:
        pytest.skip("libnvrtc / cuobjdump not found (the [test] extra installs them)")
    out = {}
    for name, text in kc.kernel_sass(kc.sass(launch.build(path, arch))).items():
        ops = kc.opcodes(text)
        count = collections.Counter()
        for op, n in ops.items():
            count[op.split(".")[0]] += n
        out[name] = (ops, count)
    return out


def w4a8_gpu_load_on_cpu(out, glue=()):
    """An is-w4a8 OUT in float16 on the CPU, set up as ``load(OUT, device="cuda")`` sets it up on a
    GPU: siblings joined (q/k/v and gate/up one GEMM each), every W4A8 layer's kernel copy prepared
    (for the emulator), and the float glue of ``glue`` ("norm", "rope", "swiglu") on its kernels."""
    import torch

    from qconvert import load
    from qconvert.layouts.int4 import W4A8Linear
    from qconvert.runtime import use_glue_kernels
    from qconvert.runtime import fuse_siblings

    model = load(out, dtype=torch.float16)
    assert fuse_siblings(model)
    for m in model.modules():
        if isinstance(m, W4A8Linear):
            m.prepare_cuda(torch.device("cpu"))
    use_glue_kernels(model, "cpu", glue)
    return model


def on_device(t, device):
    """``t`` on ``device`` with its shape, strides and storage offset kept: its whole storage moved
    and viewed as before, so a strided layout (a view of a joined projection) stays strided
    (``t.to(device)`` gives a non-dense view a dense copy)."""
    words = t.untyped_storage().nbytes() // t.element_size()
    return t.detach().as_strided((words,), (1,), 0).to(device).as_strided(t.shape, t.stride(), t.storage_offset())


def gpu_load_kernel_calls(out, monkeypatch, kernels, fn: str, cls: str, attr: str, off: str):
    """A GPU load of ``out`` with its float glue on a kernel: every ``cls`` module has its forward
    replaced and its ``attr`` set to a CUDA device (asserted); a forward runs with the launcher
    ``kernels.fn`` counted.  Returns (the modules, the launcher's calls, the logits, the logits of
    a load with ``off=False``: the kernel turned off)."""
    import torch

    from qconvert import load

    model = load(out, device="cuda")
    mods = [m for m in model.modules() if type(m).__name__ == cls]
    assert mods and all("forward" in m.__dict__ and getattr(m, attr).type == "cuda" for m in mods)
    calls = []
    launch = getattr(kernels, fn)
    monkeypatch.setattr(kernels, fn, lambda *a, **kw: calls.append(a) or launch(*a, **kw))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]], device="cuda")
    with torch.no_grad():
        got = model(ids).logits
        want = load(out, device="cuda", **{off: False})(ids).logits
    return mods, calls, got, want


def mutation_tests(runner, cases: dict, mutations: frozenset):
    """The two tests of a kernel emulator's mutations, for a test module to bind at top level:
    each mutation in ``cases`` caught as it says ("error" or "differs", ``assert_mutation_caught``:
    ``runner(mutations=...)`` runs a launch and compares), and every one of the emulator's
    ``mutations`` given a case."""
    import pytest

    @pytest.mark.parametrize("mutation", sorted(cases))
    def test_mutation_is_caught(mutation):
        assert_mutation_caught(runner, (), mutation, cases[mutation], AssertionError)

    def test_every_mutation_has_a_test():
        assert set(cases) == set(mutations)

    return test_mutation_is_caught, test_every_mutation_has_a_test


def assert_wrong_arg_type_refused(monkeypatch, emulating, call) -> None:
    """The emulator refuses a launch whose int arguments come as int64 (``launch.i32`` made to
    return one): CuPy would pack 8 bytes where the kernel reads 4 and shift every later argument."""
    import numpy as np
    import pytest

    from qconvert_kernels import launch

    real = launch.i32
    monkeypatch.setattr(launch, "i32", lambda v: np.int64(real(v)))
    with emulating(), pytest.raises(AssertionError, match="arguments of types"):
        call()


def assert_kernel_args(source: str, macro: str, params: tuple, types: tuple) -> None:
    """An emulator reads its kernel's own argument list: ``params`` are the names the argument-list
    macro ``#define MACRO \\ <params>`` of ``source`` declares, in order, and ``types`` the numpy
    type each declared C type is passed as (pointer: uint64, int: int32, long long: int64)."""
    import re

    import numpy as np

    assert macro_params(source, macro) == tuple(params)
    declared = re.search(rf"#define {macro}\s*\\(.*?)\n\n", source, re.S).group(1)
    kinds = [("ptr" if "*" in p else p.split()[0]) for p in re.sub(r"/\*.*?\*/|\\", "", declared).split(",")]
    want = {"ptr": np.uint64, "int": np.int32, "long": np.int64}
    assert tuple(want[k] for k in kinds) == tuple(types)


def macro_params(source: str, macro: str) -> tuple[str, ...]:
    """The parameter names a kernel macro of a .cu source declares, in order: an entry-point macro
    ``#define MACRO(NAME, BF16) ... NAME(<params>) {`` or an argument-list macro ``#define MACRO \\
    <params>`` (ending at a blank line or the next directive); comments are dropped."""
    import re

    m = (re.search(rf"#define {macro}\(NAME, BF16\).*?NAME\((.*?)\) \{{", source, re.S)
         or re.search(rf"#define {macro}\s*\\?(.*?)(?:\n\n|\n#)", source, re.S))
    body = re.sub(r"/\*.*?\*/", "", m.group(1)).replace("\\", " ")
    return tuple(re.findall(r"(\w+)\s*$", d.strip())[0] for d in body.split(",") if d.strip())


@functools.lru_cache(maxsize=None)
def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of /proc/cpuinfo; None where there is none."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(field))
    except (OSError, StopIteration):
        return None
    return line.split(":", 1)[1].strip()


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux lists them (/proc/cpuinfo); None where it cannot tell."""
    flags = _cpuinfo("flags")
    return None if flags is None else set(flags.split())


# The float path the calibrated golden bytes were first pinned on.  conftest.py caps torch's and
# MKL's kernels at AVX2, but MKL still picks its kernels by the CPU's vendor: an Intel Xeon
# (2026-12-04, AVX-512 VNNI) sums the tiny models' float GEMMs in another order than the AMD EPYC
# the goldens were made on, so every calibrated case (GPTQ's Hessian, QUIK's outlier channels,
# I-LLM's smoothing) writes other bytes or other report figures there (QUIK's golden files: the
# same tensors, GPTQ losses that differ in the 7th digit).  Such cases keep one pinned result per
# vendor.
GOLDEN_VENDOR = "AuthenticAMD"


def cpu_vendor() -> str:
    """The CPU's vendor as Linux names it (``vendor_id`` in /proc/cpuinfo: AuthenticAMD,
    GenuineIntel), else the machine type (``platform.machine()``)."""
    import platform

    vendor = _cpuinfo("vendor_id")
    return (vendor if vendor is not None else platform.machine()) or "unknown"


def run_benchmark_without_gpu(script: Path, *args: str):
    """A GPU benchmark script run as a user would, on this machine with no CUDA device (its own
    process, only PYTHONPATH set): the completed process, for its refusal to be checked."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})



def multimodal_config(model_type="gemma3", hidden=64, layers=2, intermediate=160, vocab=300, heads=4, kv_heads=2,
                      moe_intermediate=96):
    """A tiny Gemma-3 (SigLIP encoder), Mistral-3 (Pixtral encoder), LLaVA (CLIP encoder, a
    Mistral language model as Pixtral-12B's), InternVL3, SmolVLM2, Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3-VL-MoE
    image-text model: its language model as ``tiny_config`` builds it (Qwen3-VL-MoE's: 4 experts of
    ``moe_intermediate``, top-2), with 28 x 28 images of 7 x 7 patches."""
    from transformers import AutoConfig

    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=256)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=7, num_channels=3)
    if model_type == "gemma3":  # as Gemma-3 4B-27B: linear RoPE scaling on the global layers, no vision head
        text.update(ARCH["gemma3_text"], sliding_window=64, rope_scaling={"rope_type": "linear", "factor": 8.0},
                    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
        text.update(head_dim=max(16, hidden // heads), query_pre_attn_scalar=max(16, hidden // heads))
        text.pop("architectures")
        return AutoConfig.for_model("gemma3", text_config=text, vision_config=dict(
            vision, model_type="siglip_vision_model", vision_use_head=False), mm_tokens_per_image=4,
            image_token_index=vocab - 1, boi_token_index=vocab - 3, eoi_token_index=vocab - 2)
    if model_type.startswith("qwen"):  # M-RoPE; 28 x 28 images of 7 x 7 patches, merged 2 x 2 into 4 tokens
        half = hidden // heads // 2  # M-RoPE's sections split the head's frequencies as Qwen's 16, 24, 24 of 64 do
        sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
        special = dict(image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
                       vision_end_token_id=vocab - 4)
        if model_type in ("qwen3_vl", "qwen3_vl_moe"):  # DeepStack features added after both text layers
            if model_type == "qwen3_vl_moe":  # Qwen3-VL-30B-A3B's kind: 4 experts here, top-2 (its config names norm_topk_prob too, which vLLM reads)
                text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=moe_intermediate, norm_topk_prob=True,
                            decoder_sparse_step=1)
            return AutoConfig.for_model(model_type, text_config=dict(text, head_dim=hidden // heads, rope_scaling={
                "rope_type": "default", "mrope_section": sections, "mrope_interleaved": True}), vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=7,
                deepstack_visual_indexes=[0, 1], num_position_embeddings=16), **special)
        vision = dict(depth=1, num_heads=2, patch_size=7)
        vision.update(dict(embed_dim=32, hidden_size=hidden, mlp_ratio=2) if model_type == "qwen2_vl" else
                      dict(hidden_size=32, intermediate_size=64, out_hidden_size=hidden, fullatt_block_indexes=[0],
                           window_size=28))
        return AutoConfig.for_model(model_type, text_config=dict(text, rope_scaling={
            "type": "mrope", "mrope_section": sections}), vision_config=vision, **special)
    if model_type == "internvl":  # InternVL3: a Qwen2 language model; 4 x 4 patches shuffled into 4 tokens
        return AutoConfig.for_model("internvl", text_config=dict(text, model_type="qwen2", tie_word_embeddings=False),
                                    vision_config=dict(vision, image_size=[28, 28], patch_size=[7, 7]),
                                    image_token_id=vocab - 1, tie_word_embeddings=False)
    if model_type in ("smolvlm", "idefics3"):  # SmolVLM2, Idefics3: a Llama; 4 x 4 patches shuffled into 4 tokens
        return AutoConfig.for_model(model_type, text_config=dict(text, model_type="llama", tie_word_embeddings=False),
                                    vision_config=vision, image_token_id=vocab - 1, scale_factor=2,
                                    tie_word_embeddings=False)
    text.update(model_type="mistral", head_dim=hidden // heads, sliding_window=None, tie_word_embeddings=False)
    if model_type == "llava":
        return AutoConfig.for_model("llava", text_config=text, vision_config=dict(
            vision, model_type="clip_vision_model", projection_dim=32), image_token_index=vocab - 1,
            tie_word_embeddings=False)
    return AutoConfig.for_model("mistral3", text_config=text, vision_config=dict(vision, model_type="pixtral", head_dim=16),
                                image_token_index=vocab - 1, spatial_merge_size=2, tie_word_embeddings=False)


def write_multimodal(directory: Path, config, fused_as_saved: bool = False) -> Path:
    """A multimodal checkpoint with random weights as the published ones name them (transformers
    writes a SigLIP or CLIP tower without the ``vision_model.`` that Google's and llava-hf's files,
    and vLLM, have) and lay them out (Qwen3-VL-MoE's fused experts input first, [E, H, 2I] and
    [E, I, H], where transformers 5 saves [E, 2I, H] and [E, H, I]: ``fused_as_saved`` keeps those)."""
    from transformers import AutoModelForImageTextToText

    directory = Path(directory)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():  # norms and biases away from their initial ones and zeros, so that folding them matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(p + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    if config.vision_config.model_type in ("siglip_vision_model", "clip_vision_model"):
        from safetensors.torch import load_file

        state = load_file(directory / "model.safetensors")
        write_safetensors(directory / "model.safetensors", {
            ("vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.") else k): v
            for k, v in state.items()})
    if config.model_type == "qwen3_vl_moe" and not fused_as_saved:
        from safetensors.torch import load_file

        state = load_file(directory / "model.safetensors")
        write_safetensors(directory / "model.safetensors", {
            k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
            for k, v in state.items()})
    write_multimodal_processor(directory, config)
    return directory


# the tokens each tiny image-text model's processor puts around and in place of an image, with
# their ids counted from the end of the vocabulary (where multimodal_config puts the config's ids)
QWEN_VL_TOKENS = {"<|vision_end|>": 4, "<|vision_start|>": 3, "<|video_pad|>": 2, "<|image_pad|>": 1}
IMAGE_TOKENS_OF = {"qwen2_vl": QWEN_VL_TOKENS, "qwen2_5_vl": QWEN_VL_TOKENS, "qwen3_vl": QWEN_VL_TOKENS,
                   "qwen3_vl_moe": QWEN_VL_TOKENS,
                   # Gemma's vocabulary has runs of newlines as tokens, which vLLM's processor looks up
                   "gemma3": {"\n": 7, "\n\n": 6, "\n\n\n": 5, "\n\n\n\n": 4, "<start_of_image>": 3,
                              "<end_of_image>": 2, "<image_soft_token>": 1},
                   "llava": {"<image>": 1}, "mistral3": {"[IMG_BREAK]": 3, "[IMG_END]": 2, "[IMG]": 1},
                   "internvl": {"<video>": 4, "<img>": 3, "</img>": 2, "<IMG_CONTEXT>": 1},
                   "smolvlm": {"<video>": 5, "<end_of_utterance>": 4, "<fake_token_around_image>": 3, "<global-img>": 2,
                               "<image>": 1}}
IMAGE_TOKENS_OF["idefics3"] = IMAGE_TOKENS_OF["smolvlm"]
# the config keys of those ids
IMAGE_TOKEN_KEYS = {"<|vision_end|>": "vision_end_token_id", "<|vision_start|>": "vision_start_token_id",
                    "<|video_pad|>": "video_token_id", "<|image_pad|>": "image_token_id",
                    "<start_of_image>": "boi_token_index", "<end_of_image>": "eoi_token_index",
                    "<image_soft_token>": "image_token_index", "<image>": "image_token_id", "[IMG]": "image_token_index",
                    "<IMG_CONTEXT>": "image_token_id"}
# the tokenizer attributes a processor reads them by (tokenizer_config.json's extra_special_tokens)
TOKEN_ATTRIBUTES = {"gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                               "image_token": "<image_soft_token>"},
                    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>",
                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}}
CLIP_NORM = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def processor_config(config) -> dict:
    """processor_config.json of a tiny image-text model for 28 x 28 images (what transformers 5
    saves for a processor: its image, and video, processors inside)."""
    kind, patch = config.model_type, config.vision_config.patch_size
    if kind.startswith("qwen"):
        pixels = dict(patch_size=patch, merge_size=2, temporal_patch_size=2,
                      size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28}, **CLIP_NORM)
        return {"processor_class": {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(kind, "Qwen3VLProcessor"),
                "image_processor": {"image_processor_type": "Qwen2VLImageProcessorFast", **pixels},
                "video_processor": {"video_processor_type": "Qwen3VLVideoProcessor" if kind.startswith("qwen3") else
                                    "Qwen2VLVideoProcessor", "do_sample_frames": False, **pixels}}
    if kind == "gemma3":
        return {"processor_class": "Gemma3Processor", "image_seq_length": config.mm_tokens_per_image,
                "image_processor": {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 28, "width": 28},
                                    "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_pan_and_scan": False}}
    if kind == "llava":  # CLIP's class token dropped ("default" feature selection): 16 image tokens
        return {"processor_class": "LlavaProcessor", "patch_size": patch, "vision_feature_select_strategy": "default",
                "num_additional_image_tokens": 1, "image_token": "<image>",
                "image_processor": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28},
                                    "crop_size": {"height": 28, "width": 28}, **CLIP_NORM}}
    if kind == "internvl":  # one 28 x 28 tile, no thumbnail: 4 context tokens
        tile = dict(size={"height": 28, "width": 28}, crop_to_patches=False, **CLIP_NORM)
        return {"processor_class": "InternVLProcessor", "image_seq_length": 4,
                "image_processor": {"image_processor_type": "GotOcr2ImageProcessorFast", **tile},
                "video_processor": {"video_processor_type": "InternVLVideoProcessor", **tile}}
    if kind in ("smolvlm", "idefics3"):  # the image whole (no splitting): 4 image tokens
        pixels = dict(size={"longest_edge": 28}, max_image_size={"longest_edge": 28}, do_image_splitting=False,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
        if kind == "idefics3":
            return {"processor_class": "Idefics3Processor", "image_seq_len": 4,
                    "image_processor": {"image_processor_type": "Idefics3ImageProcessor", **pixels}}
        return {"processor_class": "SmolVLMProcessor", "image_seq_len": 4,
                "image_processor": {"image_processor_type": "SmolVLMImageProcessor", **pixels},
                "video_processor": {"video_processor_type": "SmolVLMVideoProcessor", **pixels}}
    return {"processor_class": "PixtralProcessor", "patch_size": patch, "spatial_merge_size": config.spatial_merge_size,
            "image_processor": {"image_processor_type": "PixtralImageProcessor", "size": {"longest_edge": 28},
                                "patch_size": patch, **CLIP_NORM}}


def write_multimodal_processor(directory: Path, config) -> None:
    """The tokenizer, with the image tokens at the ids the config gives them, and the processor
    (as the published checkpoints have them, for an engine that processes images: vLLM)."""
    vocab = config.get_text_config().vocab_size
    special = IMAGE_TOKENS_OF[config.model_type]
    tok = tiny_tokenizer(vocab - len(special))
    ordered = sorted(special, key=lambda t: -special[t])
    tok.add_special_tokens({"additional_special_tokens": ordered})
    for token, back in special.items():
        assert tok.convert_tokens_to_ids(token) == vocab - back, token
        key = IMAGE_TOKEN_KEYS.get(token)
        assert key is None or getattr(config, key) == vocab - back, (key, getattr(config, key))
    tok.save_pretrained(directory)
    tc = json.loads((directory / "tokenizer_config.json").read_text())
    if config.model_type.startswith("qwen") or config.model_type == "internvl":  # a Qwen tokenizer, as their files
        tc["tokenizer_class"] = "Qwen2Tokenizer"  # name it (transformers takes it for a qwen2 config whatever they say)
    if config.model_type in TOKEN_ATTRIBUTES:  # the processor reads them from the tokenizer
        tc["extra_special_tokens"] = TOKEN_ATTRIBUTES[config.model_type]
    (directory / "tokenizer_config.json").write_text(json.dumps(tc))
    (directory / "processor_config.json").write_text(json.dumps(processor_config(config), indent=1))


def float_model(path):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info  # every tensor read, none left over
    return model.eval()


def fuse_experts(state: dict) -> dict:
    """``state`` with each MoE block's per-expert linears ``experts.E.{gate,up,down}_proj.weight``
    fused again as transformers 5 saves Qwen3-VL-MoE's: ``experts.gate_up_proj`` [E, 2I, H] (gate
    rows first) and ``experts.down_proj`` [E, H, I]."""
    import re

    out, blocks = {}, {}
    for name, value in state.items():
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m is None:
            out[name] = value
        else:
            blocks.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = value
    for block, w in blocks.items():
        n_exp = 1 + max(e for e, _ in w)
        out[f"{block}.gate_up_proj"] = torch.stack([torch.cat([w[e, "gate"], w[e, "up"]]) for e in range(n_exp)])
        out[f"{block}.down_proj"] = torch.stack([w[e, "down"] for e in range(n_exp)])
    return out


def write_checkpoint(src, d):
    """The multimodal checkpoint ``src`` (a source's language model, rotated or not) computes, as
    its files name it: what a float model of OUT's rotation is."""
    from qconvert.formats.safetensors_io import write_safetensors
    from qconvert.multimodal import Renamer, outer_config, view

    mm = view(src)
    rec = mm.record()
    state = fuse_experts({Renamer(rec).tensor(k): src.get(k) for k in src.keys()})
    state.update({n: torch.cat(list(src.carried_rows(n))) for n in mm.carried})
    d.mkdir()
    write_safetensors(d / "model.safetensors", state)
    (d / "config.json").write_text(json.dumps(outer_config(rec, src.config.to_dict())))
    return d


def float_checkpoint(out, mm, d):
    """The float model OUT was quantized from: the source, or the source rotated as OUT records."""
    from qconvert.source import LanguageModelSource, resolve_source
    from qconvert.verify import rotated_as_recorded

    src = rotated_as_recorded(out, resolve_source(str(mm)))
    return mm if isinstance(src, LanguageModelSource) else write_checkpoint(src, d)


def reference_with_out_weights(out, mm, d):
    """The float multimodal model OUT was made from (rotated as OUT records), its language-model
    linears holding OUT's weights (dequantized): what the export should compute."""
    from qconvert.multimodal import Renamer
    from qconvert.runtime import load

    reference, runtime = float_model(float_checkpoint(out, mm, d)), load(out)
    report = json.loads((Path(out) / "qconvert.json").read_text())
    renamer = Renamer(report["multimodal"])  # the text model's names as the multimodal class has its modules
    with torch.no_grad():
        for row in report["layers"]:
            reference.get_submodule(renamer.module(row["name"])).weight.copy_(
                runtime.get_submodule(row["name"])._dequantized(torch.float32))
    return reference


def emulated_timer(monkeypatch) -> None:
    """``qconvert.bench``'s CUDA timer replaced by one call per operand set (two sets), so a kernel
    benchmark's launches run once each on an emulator and every row it writes is a kernel that ran."""
    from qconvert import bench

    def once(launch, n_sets, runs, warmup, reps):
        for i in range(n_sets):
            launch(i)
        return bench.Timing(1.0, 1, "emulated")

    monkeypatch.setattr(bench, "_time_cuda", once)
    monkeypatch.setattr(bench, "_operand_sets", lambda *a, **k: 2)


def prediction_json(script: str) -> dict:
    """Run benchmarks/<script> --json /dev/stdout: its printed tables must be labelled a prediction;
    returns the JSON it writes after them."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    out = subprocess.run([sys.executable, str(path), "--json", "/dev/stdout"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("PREDICTION (not measured)")
    return json.loads(out[out.index("{"):])


def llama_sibling_groups(layers: int) -> list[str]:
    """The names ``runtime.fuse_siblings`` gives a Llama's joined groups, sorted: q/k/v and gate/up per layer."""
    return sorted([f"model.layers.{i}.self_attn.q_proj+k_proj+v_proj" for i in range(layers)]
                  + [f"model.layers.{i}.mlp.gate_proj+up_proj" for i in range(layers)])


def tiny_out(tiny_llama, tmp_path_factory, scheme: str):
    """A real OUT of the tiny Llama in ``scheme``, made through the CLI."""
    from click.testing import CliRunner

    from qconvert.cli import cli

    out = tmp_path_factory.mktemp(f"tiny-{scheme}") / "out"
    res = CliRunner().invoke(cli, ["quantize", str(tiny_llama), "--scheme", scheme, "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    return out


def needs_compressed_tensors() -> None:
    """transformers reads an export only with the compressed-tensors package (the [test] extra has it;
    the GPU image, benchmarks/image_suite.sh's environment, does not): skip where it is missing."""
    import pytest

    pytest.importorskip("compressed_tensors", reason='compressed-tensors is not installed: pip install -e ".[test]"')


def needs_cpu_row_scaled_mm():
    """A skip mark for the tests that run ZeroQuant-FP's row-wise FP8 GEMM (torch._scaled_mm with a scale
    per row) on the CPU: torch 2.13's CPU build has it, torch 2.11's (the GPU image's; benchmarks/
    image_suite.sh) only tensor-wise scales, so there the layers keep the first kernels, as
    ``scaled_mm_outputs`` decides on any device.  The FP8 GPU tests run the path on a GPU."""
    import pytest

    from qconvert_kernels.fp8 import cuda as cuda_fp8

    return pytest.mark.skipif(not any(cuda_fp8.scaled_mm_outputs("cpu").values()),
                              reason="this torch's CPU build has no row-wise torch._scaled_mm (torch 2.11: tensor-wise only)")
