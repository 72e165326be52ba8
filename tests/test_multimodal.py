"""Multimodal checkpoints (Gemma-3 4B and up: ``gemma3``; Mistral-Small-3.1: ``mistral3``; LLaVA-1.5
and Pixtral-12B: ``llava``; InternVL3: ``internvl``; SmolVLM2, Idefics3: ``smolvlm``, ``idefics3``; Qwen2-VL,
Qwen2.5-VL, Qwen3-VL: ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``) through qconvert as their users run them, on tiny random models written by transformers with the published
checkpoints' names: the language model read as its text model, quantized, verified, evaluated and
decoded; the image encoder and projector carried bit for bit; the export loaded by transformers as
the multimodal model again, answering an image prompt as the float model with the OUT's weights
does.  vLLM: tests/test_vllm.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import (check_export_scores_as_runtime, check_tiny_out, cli_ok, float_model, multimodal_config,
                     needs_compressed_tensors, quantize_tiny, reference_with_out_weights, run_cli, text_files,
                     write_checkpoint, write_multimodal)
from qconvert.multimodal import CARRIED_DIR, FAMILIES, Renamer
from qconvert.source import LanguageModelSource, resolve_source

KINDS = ["gemma3", "mistral3", "llava", "internvl", "smolvlm", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]  # Qwen2-VL: where it differs
ROTATED = [k for k in KINDS + ["qwen2_vl", "idefics3"] if k != "gemma3"]  # Gemma-3 is not rotated (its norms)
IMAGE_TOKENS = {"gemma3": 4, "mistral3": 4, "llava": 16}  # what a 28 x 28 image becomes in each tiny model (Qwen: 4)
TEXT_AS = {"gemma3": "gemma3_text", "internvl": "qwen2", "smolvlm": "llama", "idefics3": "llama", "qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2",
           "qwen3_vl": "qwen3", "qwen3_vl_moe": "qwen3_moe"}  # else mistral


@pytest.fixture(scope="module", params=KINDS)
def mm(request, tmp_path_factory):
    d = text_files(tmp_path_factory.mktemp(request.param))
    return write_multimodal(d / "src", multimodal_config(request.param))


def image_prompt(config) -> dict:
    """One 28 x 28 image and text around its placeholder tokens."""
    image = torch.linspace(-1, 1, 3 * 28 * 28).reshape(1, 3, 28, 28)
    if config.model_type.startswith("qwen"):  # 4 x 4 patches of 2 frames x 3 channels x 7 x 7, as the processor flattens them
        ids = [5, 17, 42, config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id, 7, 99]
        patches = image.reshape(3, 4, 7, 4, 7).permute(1, 3, 0, 2, 4).reshape(16, 3, 1, 7, 7).expand(16, 3, 2, 7, 7)
        ids = torch.tensor([ids])
        return {"input_ids": ids, "pixel_values": patches.reshape(16, -1), "image_grid_thw": torch.tensor([[1, 4, 4]]),
                "mm_token_type_ids": (ids == config.image_token_id).int()}  # as the processor marks image tokens
    image_id = getattr(config, "image_token_index", None) or config.image_token_id
    ids = [5, 17, 42] + [image_id] * IMAGE_TOKENS.get(config.model_type, 4) + [7, 99, 23, 64]
    kw = {"input_ids": torch.tensor([ids]), "pixel_values": image[None] if config.model_type in ("smolvlm", "idefics3") else image}
    if config.model_type == "mistral3":
        kw["image_sizes"] = torch.tensor([[28, 28]])
    return kw


def test_the_language_model_reads_as_its_text_model(mm):
    """The view's float text model gives the multimodal model's own logits on text."""
    src = resolve_source(str(mm))
    assert isinstance(src, LanguageModelSource) and src.carried
    assert src.config.model_type == TEXT_AS.get(src.outer_config.model_type, "mistral")
    ids = torch.randint(3, 290, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = src.load_model()(ids).logits
        theirs = float_model(mm)(input_ids=ids).logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), (ours - theirs).abs().max()


def kind_of(mm) -> str:
    return json.loads((mm / "config.json").read_text())["model_type"]


def test_quantize_keeps_the_image_parts(mm, tmp_path):
    """is-w4a8 with the preset's defaults: the image parts bit for bit, but for the projector's
    output linears where the stream is rotated (all but Gemma-3)."""
    out, text = tmp_path / "out", mm.parent / "text.raw"
    res = cli_ok(quantize_tiny(mm, out, "is-w4a8"))
    report = json.loads((out / "qconvert.json").read_text())
    rec = report["multimodal"]
    if kind_of(mm) == "gemma3":
        assert "rotation does not support model type 'gemma3_text'" in res.output and "rotated" not in rec
    else:
        assert "residual stream rotated" in res.output and report["rotation"]["mode"] == "hadamard"
        # weight and bias of each (Mistral-3's and SmolVLM's have no bias; Qwen3-VL: the merger and 2 DeepStack mergers)
        writes = {"mistral3": 1, "smolvlm": 1, "qwen3_vl": 6, "qwen3_vl_moe": 6}.get(kind_of(mm), 2)
        assert set(rec["rotated"]) == {k for k in load_file(mm / "model.safetensors")
                                       if FAMILIES[kind_of(mm)].stream_write(k)} and len(rec["rotated"]) == writes
    assert (rec["text_prefix"], rec["head"]) == {
        "qwen2_5_vl": ("model.", "lm_head.weight"), "qwen3_vl": ("model.language_model.", "lm_head.weight"),
        "qwen3_vl_moe": ("model.language_model.", "lm_head.weight"),
        "smolvlm": ("model.text_model.", "lm_head.weight")}.get(
        kind_of(mm), ("language_model.model.", "language_model.lm_head.weight"))
    src_state = load_file(mm / "model.safetensors")
    carried = load_file(out / CARRIED_DIR / "model.safetensors")
    image_parts = {k for k in src_state if FAMILIES[kind_of(mm)].carries(k)}
    assert image_parts and all(k.startswith(("vision_tower.", "multi_modal_projector.", "visual.", "model.visual.",
                                             "model.vision_model.", "model.connector.")) for k in image_parts)
    assert set(carried) == image_parts and rec["tensors"] == len(image_parts)
    kept = image_parts - set(rec.get("rotated", []))
    assert all(torch.equal(carried[k], src_state[k]) and carried[k].dtype == src_state[k].dtype for k in kept)
    assert all(not torch.equal(carried[k], src_state[k]) for k in rec.get("rotated", []))
    down = "model.layers.1.mlp." + ("experts.3.down_proj" if kind_of(mm) == "qwen3_vl_moe" else "down_proj")
    assert {r["name"] for r in report["layers"]} >= {"model.layers.1.self_attn.q_proj", down}
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert f"{CARRIED_DIR}/model.safetensors" in manifest  # verify checks its bytes, push uploads it
    check_tiny_out(out, mm, text)


def image_logits(path):
    model = float_model(path)
    with torch.no_grad():
        return model(**image_prompt(model.config)).logits


@pytest.mark.parametrize("kind", ROTATED)
def test_the_rotated_model_answers_an_image_prompt_as_the_original(kind, tmp_path):
    """The residual stream rotated, the projector's output linears with it (Qwen3-VL: its DeepStack
    mergers too, and Qwen3-VL-MoE's): the same logits on a prompt with an image (the rotation's tolerance,
    tests/test_rotation.py); with the projector left unrotated they are not (nor, for Qwen3-VL, with
    its DeepStack mergers alone left unrotated)."""
    from qconvert.solvers.rotation import RotatedSource

    src = write_multimodal(tmp_path / "src", multimodal_config(kind))
    want = image_logits(src)
    rot = RotatedSource(resolve_source(str(src)), "hadamard", seed=3)
    got = image_logits(write_checkpoint(rot, tmp_path / "rotated"))
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4
    rotated_rows = rot.carried_rows
    controls = {"unrotated-projector": lambda name: rot.src.carried_rows(name)}  # the image features enter unrotated
    if kind.startswith("qwen3_vl"):
        controls["unrotated-deepstack"] = lambda name: (rot.src.carried_rows(name) if "deepstack" in name
                                                        else rotated_rows(name))
    for control, rows in controls.items():
        rot.carried_rows = rows
        wrong = image_logits(write_checkpoint(rot, tmp_path / control))
        assert float((wrong - want).abs().max() / want.abs().max()) > 0.01, control


def test_the_export_is_the_multimodal_model_again(mm, tmp_path):
    """transformers loads the export as the multimodal class (every tensor used); on text it scores
    as qconvert's runtime scores the OUT; on an image prompt it gives the logits of the float
    model (rotated as OUT was) whose language-model linears hold the OUT's weights."""
    needs_compressed_tensors()
    if kind_of(mm) == "qwen3_vl_moe":
        pytest.skip("transformers reads Qwen3-VL-MoE's experts only fused: test_a_qwen3_vl_moe_export_keeps_one_linear_per_expert")
    out, dest = check_export_scores_as_runtime(mm, tmp_path)
    cfg = json.loads((dest / "config.json").read_text())
    src_cfg = json.loads((mm / "config.json").read_text())
    assert cfg["model_type"] in KINDS and cfg["text_config"]["model_type"] == src_cfg["text_config"]["model_type"]
    assert cfg["text_config"].get("rope_parameters") == src_cfg["text_config"].get("rope_parameters")  # M-RoPE's
    report = json.loads((out / "qconvert.json").read_text())
    renamer = Renamer(report["multimodal"])
    assert set(renamer.ignored_parts()) <= set(cfg["quantization_config"]["ignore"])
    assert all(any(part in p for part in ("visual", "vision_tower", "multi_modal_projector", "vision_model", "connector"))
               for p in renamer.ignored_parts())

    layers = report["layers"]
    quantized = {renamer.tensor(r["name"] + ".weight") for r in layers}
    names = set(load_file(dest / "model.safetensors"))
    assert set(load_file(mm / "model.safetensors")) - quantized <= names  # the checkpoint's own names
    exported, reference = float_model(dest), reference_with_out_weights(out, mm, tmp_path / "float")
    with torch.no_grad():
        prompt = image_prompt(reference.config)
        got, want = exported(**prompt).logits, reference(**prompt).logits
        without = reference(input_ids=prompt["input_ids"]).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(without, want, atol=1e-3)  # the image did reach the logits


def test_an_explicit_rotation_of_gemma3_is_refused_with_the_fix(tmp_path):
    src = write_multimodal(text_files(tmp_path) / "src", multimodal_config("gemma3"))
    res = quantize_tiny(src, tmp_path / "out", "w4a16-gptq", "--rotate", "hadamard")
    assert res.exit_code != 0 and "convert without --rotate" in res.output and not (tmp_path / "out").exists()


def test_a_tensor_of_no_known_part_is_refused_before_any_work(mm, tmp_path):
    import shutil

    from qconvert.formats.safetensors_io import write_safetensors

    odd = tmp_path / "src"
    shutil.copytree(mm, odd)
    shutil.copy(mm.parent / "calib.txt", tmp_path / "calib.txt")
    state = load_file(odd / "model.safetensors")
    write_safetensors(odd / "model.safetensors", {**state, "audio_tower.proj.weight": torch.zeros(2, 2)})
    res = quantize_tiny(odd, tmp_path / "out", "w4a16-gptq")
    assert res.exit_code != 0 and "'audio_tower.proj.weight'" in res.output and "would lose it" in res.output
    assert not (tmp_path / "out").exists()


def test_verify_finds_a_changed_image_part(mm, tmp_path):
    """An image tensor changed after quantizing (manifest rewritten, so only the comparison can
    tell) fails verify against the source; a missing one fails the structure check."""
    from qconvert.formats.native import write_manifest
    from qconvert.formats.safetensors_io import write_safetensors

    out = tmp_path / "out"
    cli_ok(quantize_tiny(mm, out, "w4a16-gptq", "--base", "rtn"))
    path = out / CARRIED_DIR / "model.safetensors"
    state = load_file(path)
    name = sorted(state)[0]
    write_safetensors(path, {**state, name: state[name] + 1})
    write_manifest(out)
    res = run_cli("verify", out, "--data-file", mm.parent / "text.raw", ok=False)
    assert res.exit_code != 0 and f"{CARRIED_DIR}/{name} differs from the source's" in res.output, res.output
    write_safetensors(path, {k: v for k, v in state.items() if k != name})
    write_manifest(out)
    res = run_cli("verify", out, "--no-compare", ok=False)
    assert res.exit_code != 0 and "qconvert.json records" in res.output, res.output


def test_inspect_and_the_cards_say_what_was_kept(mm, tmp_path):
    from qconvert.hub import export_card, model_card

    out, dest = tmp_path / "out", tmp_path / "ct"
    cli_ok(quantize_tiny(mm, out, "w4a16-gptq", "--base", "rtn", "--rotate", "none" if kind_of(mm) == "gemma3" else "hadamard"))
    rotated = kind_of(mm) != "gemma3"
    assert "image encoder and projector" in run_cli("inspect", out).output
    shown = run_cli("inspect", out).output
    written = json.loads((out / "qconvert.json").read_text())["multimodal"].get("rotated", [])
    assert bool(written) == rotated and all(n in shown for n in written)
    assert ("rotated with the residual stream" in shown) == rotated
    assert "kept bit for bit as the source has them" in model_card(out)
    assert ("rotated with the residual stream" in model_card(out)) == rotated
    run_cli("export", out, "-o", dest)
    card = export_card(dest)
    assert "pipeline_tag: image-text-to-text" in card and "kept bit for bit as the source has them" in card


def test_a_hub_id_in_the_cache_resolves_to_its_language_model(mm, tmp_path, monkeypatch):
    """``qconvert quantize google/gemma-3-4b-it`` as a user runs it offline: the Hub id from the
    huggingface_hub cache is read as its language model, and OUT records the Hub id and commit."""
    import huggingface_hub.constants as c

    from test_source import _hf_cache

    cache = tmp_path / "hub"
    snap = _hf_cache(cache, "acme/tiny-vlm", mm)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    src = resolve_source("acme/tiny-vlm")
    assert isinstance(src, LanguageModelSource) and src.directory == snap
    assert (src.hub_id, src.revision, src.description) == ("acme/tiny-vlm", snap.name, "acme/tiny-vlm")
    out = tmp_path / "out"
    res = run_cli("quantize", "acme/tiny-vlm", "--scheme", "w4a16-gptq", "--base", "rtn", "-o", out, "-q")
    report = json.loads((out / "qconvert.json").read_text())
    assert report["source_info"]["id"] == "acme/tiny-vlm" and report["source_info"]["revision"] == snap.name, res.output
    assert report["multimodal"]["tensors"] > 0 and (out / CARRIED_DIR / "model.safetensors").is_file()


@pytest.mark.parametrize("kind,naming", [("qwen2_vl", "published"), ("qwen2_5_vl", "module tree")])
def test_qwen_vl_checkpoints_read_as_qwen2(kind, naming, tmp_path):
    """Qwen2-VL and Qwen2.5-VL as published (language model under model., image encoder under
    visual.) or saved as transformers' module tree: read as a Qwen2 text model whose logits on text
    are the multimodal model's, M-RoPE's sections dropped, its image encoder carried."""
    import shutil

    from qconvert.formats.safetensors_io import write_safetensors

    src = write_multimodal(text_files(tmp_path) / "src", multimodal_config(kind))
    state = load_file(src / "model.safetensors")
    assert "model.embed_tokens.weight" in state and any(k.startswith("visual.") for k in state)
    if naming == "module tree":
        tree = tmp_path / "tree"
        shutil.copytree(src, tree)
        write_safetensors(tree / "model.safetensors", {
            ("model.language_model." + k.removeprefix("model.") if k.startswith("model.") else
             "model." + k if k.startswith("visual.") else k): v for k, v in state.items()})
        src = tree
    view = resolve_source(str(src))
    assert view.config.model_type == "qwen2" and view.prefix == {"published": "model."}.get(naming, "model.language_model.")
    assert "mrope_section" not in view.config.rope_parameters and len(view.carried) == sum(
        k.startswith("visual.") for k in state)
    ids = torch.randint(3, 290, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, theirs = view.load_model()(ids).logits, float_model(src)(input_ids=ids).logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), (ours - theirs).abs().max()


def test_a_qwen_vl_rope_other_than_mrope_is_refused(tmp_path):
    """A Qwen2.5-VL config with YaRN scaling (as its card suggests for long inputs) is not one
    qconvert reads as Qwen2: refused with the fix, before any work."""
    src = write_multimodal(text_files(tmp_path) / "src", multimodal_config("qwen2_5_vl"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                             "original_max_position_embeddings": 64, "mrope_section": [2, 3, 3]}
    (src / "config.json").write_text(json.dumps(cfg))
    res = quantize_tiny(src, tmp_path / "out", "w4a16-gptq")
    assert res.exit_code != 0 and "RoPE type 'yarn'" in res.output and "rope_scaling" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_idefics3_reads_as_its_llama(tmp_path):
    """Idefics3 (SmolVLM's layout): a Llama under model.text_model., logits on text as the
    multimodal model's; the vision model and connector carried."""
    src = write_multimodal(text_files(tmp_path) / "src", multimodal_config("idefics3"))
    view = resolve_source(str(src))
    assert view.config.model_type == "llama" and view.prefix == "model.text_model."
    assert view.carried and all(n.startswith(("model.vision_model.", "model.connector.")) for n in view.carried)
    ids = torch.randint(3, 290, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ours, theirs = view.load_model()(ids).logits, float_model(src)(input_ids=ids).logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), (ours - theirs).abs().max()


def test_a_tied_head_rotated_exports_untied(tmp_path):
    """Qwen3-VL 2B / 4B tie the head to the embedding (no lm_head.weight in the checkpoint): the
    rotated OUT unties it (the final norm folded into the head), and the export, untied too, is the
    multimodal model again: text scored as the runtime scores the OUT, an image prompt answered as
    the float model with the OUT's weights answers it."""
    needs_compressed_tensors()
    config = multimodal_config("qwen3_vl")
    config.tie_word_embeddings = config.get_text_config().tie_word_embeddings = True
    src = write_multimodal(text_files(tmp_path) / "src", config)
    assert "lm_head.weight" not in load_file(src / "model.safetensors")
    out, dest = check_export_scores_as_runtime(src, tmp_path)
    assert json.loads((out / "qconvert.json").read_text())["rotation"]["mode"] == "hadamard"
    assert not json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    assert not json.loads((dest / "config.json").read_text())["tie_word_embeddings"]
    exported, reference = float_model(dest), reference_with_out_weights(out, src, tmp_path / "float")
    with torch.no_grad():
        prompt = image_prompt(reference.config)
        got, want = exported(**prompt).logits, reference(**prompt).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_a_flat_qwen2_5_vl_config_as_published(tmp_path):
    """Qwen2.5-VL's published config.json keeps the text fields at the top (no text_config) with
    rope_scaling {"type": "mrope", ...}: read, quantized and exported as the nested one is; the
    export's text_config keeps M-RoPE's sections and transformers loads it as the multimodal class."""
    needs_compressed_tensors()
    src = write_multimodal(text_files(tmp_path) / "src", multimodal_config("qwen2_5_vl"))
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**cfg, **{k: v for k, v in text.items() if k not in ("model_type", "architectures", "dtype")},
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}, "rope_theta": rope["rope_theta"]}
    (src / "config.json").write_text(json.dumps(flat))
    assert resolve_source(str(src)).config.model_type == "qwen2"
    out, dest = check_export_scores_as_runtime(src, tmp_path)
    exported = json.loads((dest / "config.json").read_text())
    assert exported["text_config"]["rope_parameters"]["mrope_section"] == rope["mrope_section"]
    assert type(float_model(dest)).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_qwen3_vl_moe_reads_its_fused_experts_in_either_layout(tmp_path):
    """Qwen3-VL-MoE's experts are fused in its files, input first as published ([E, H, 2I], [E, I, H])
    or as transformers 5 saves them ([E, 2I, H], [E, H, I]): both read as the same per-expert linears
    (each from its own rows), and a fused tensor of neither shape is refused with the fix."""
    from safetensors.torch import save_file

    config = multimodal_config("qwen3_vl_moe")
    published = resolve_source(str(write_multimodal(tmp_path / "published", config)))
    saved_dir = write_multimodal(tmp_path / "saved", config, fused_as_saved=True)
    saved = resolve_source(str(saved_dir))
    names = published.keys()
    assert names == saved.keys() and "model.layers.1.mlp.experts.3.up_proj.weight" in names
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
    assert published.config.model_type == "qwen3_moe" and published.config.norm_topk_prob  # always renormalized
    for name in names:
        a, b = published.get(name), saved.get(name)
        assert torch.equal(a, b) and published.info(name) == (a.dtype, tuple(a.shape)) == saved.info(name), name
    fused = load_file(saved_dir / "model.safetensors")
    gate_up = fused["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(saved.get("model.layers.0.mlp.experts.2.up_proj.weight"), gate_up[2, 96:])
    fused["model.language_model.layers.0.mlp.experts.down_proj"] = torch.zeros(4, 64, 95)
    save_file(fused, saved_dir / "model.safetensors")
    res = run_cli("quantize", saved_dir, "--scheme", "is-w4a8-rtn", "-o", tmp_path / "out", ok=False)
    msg = " ".join(res.output.split())
    assert res.exit_code == 1 and "model.language_model.layers.0.mlp.experts.down_proj' have shape [4, 64, 95]" in msg \
        and "check config.json" in msg, msg
    assert not (tmp_path / "out").exists()


def test_a_qwen3_vl_moe_export_keeps_one_linear_per_expert(tmp_path):
    """Qwen3-VL-MoE exports one compressed linear per expert under the checkpoint's prefix (as
    llm-compressor writes them and vLLM reads them: tests/test_vllm.py serves it), the routers and
    the image parts in ``ignore`` and the source's own text config; transformers maps this model's
    experts only from fused tensors, so ``qconvert eval`` of the export says so and names the OUT,
    and the export's card leads to vLLM."""
    needs_compressed_tensors()
    from qconvert.hub import export_card

    mm = write_multimodal(text_files(tmp_path) / "src", multimodal_config("qwen3_vl_moe"))
    out, dest = tmp_path / "out", tmp_path / "ct"
    cli_ok(quantize_tiny(mm, out, "w4a16-gptq", "--base", "rtn"))
    run_cli("export", out, "-o", dest)
    names = set(load_file(dest / "model.safetensors"))
    prefix = "model.language_model.layers"
    assert {f"{prefix}.{i}.mlp.experts.{e}.{p}_proj.weight_packed" for i in range(2) for e in range(4)
            for p in ("gate", "up", "down")} <= names
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
    cfg, src_cfg = (json.loads((d / "config.json").read_text()) for d in (dest, mm))
    assert cfg["text_config"]["model_type"] == "qwen3_vl_moe_text"
    # the source's own text config (norm_topk_prob, which vLLM reads, and M-RoPE included); the head untied by the rotation
    assert all(cfg["text_config"][k] == v for k, v in src_cfg["text_config"].items()
               if k not in ("transformers_version", "tie_word_embeddings"))
    assert cfg["text_config"]["rope_parameters"] == src_cfg["text_config"]["rope_parameters"]
    ignore = cfg["quantization_config"]["ignore"]
    assert {f"{prefix}.{i}.mlp.gate" for i in range(2)} <= set(ignore) and "re:.*visual.*" in ignore
    res = run_cli("eval", dest, "--data-file", mm.parent / "text.raw", ok=False)
    msg = " ".join(res.output.split())
    assert res.exit_code == 1 and "reads Qwen3-VL-MoE's experts only as fused tensors" in msg and "evaluate the OUT" in msg, msg
    card = export_card(dest)
    assert "Not with transformers" in card and "vllm serve" in card and "AutoModelForCausalLM" not in card
