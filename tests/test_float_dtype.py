"""``quantize --float-dtype``: the dtype OUT keeps its unquantized tensors in (auto: the source's own
precision, which for a GGUF file is not the float32 transformers dequantizes it to)."""

import json

import numpy as np
import pytest
import torch
from helpers import run_cli, tiny_config, write_model

from qconvert import load, quantize
from qconvert.errors import QConvertError
from qconvert.formats.safetensors_io import ShardedReader
from qconvert.source import gguf_float_dtype


def _gguf(path, tensors: dict) -> str:
    from gguf import GGMLQuantizationType, GGUFWriter

    w = GGUFWriter(str(path), "llama")
    for name, (array, raw) in tensors.items():
        w.add_tensor(name, array, raw_dtype=getattr(GGMLQuantizationType, raw) if raw else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kinds, expected", [
    ({"F32": np.float32}, None),
    ({"F32": np.float32, "F16": np.float16}, torch.float16),
    ({"F32": np.float32, "Q8_0": None}, torch.float16),  # a block format: its block scales are float16
    ({"F16": np.float16, "BF16": None}, torch.bfloat16),
])
def test_gguf_precision_read_from_its_tensor_types(tmp_path, kinds, expected):
    tensors = {}
    for i, (kind, np_dtype) in enumerate(kinds.items()):
        if kind == "Q8_0":  # one block of 32: a float16 scale, then 32 int8
            tensors[f"t{i}"] = (np.zeros((1, 34), dtype=np.uint8), "Q8_0")
        elif kind == "BF16":
            tensors[f"t{i}"] = (np.zeros((4, 32), dtype=np.uint16), "BF16")
        else:
            tensors[f"t{i}"] = (np.ones((4, 32), dtype=np_dtype), None)
    assert gguf_float_dtype(_gguf(tmp_path / "m.gguf", tensors)) == expected


def test_the_real_gguf_is_float16(smollm2):
    """SmolLM2's file: Q4_1 linears, a Q8_0 embedding, F32 norms."""
    assert smollm2.float_dtype == torch.float16


@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
    """A tiny float32 Llama whose embedding holds one value beyond float16's range."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config()
    torch.manual_seed(0)
    state = {k: v.detach().clone().contiguous() for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    state["model.embed_tokens.weight"][3, 5] = 1.0e5
    return write_model(tmp_path_factory.mktemp("big") / "llama", cfg, state)


def _dtypes(out) -> dict:
    reader = ShardedReader(out)
    return {name: reader.info(name).dtype for name in reader.keys()}


def test_explicit_dtype_casts_the_float_tensors_only(tiny_llama, tiny_rtn_out, tmp_path):
    out = tmp_path / "bf16"
    res = run_cli("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-o", out, "--float-dtype", "bfloat16", "-q")
    assert "precision of the" not in res.output  # the note is for a source read wider than stored
    mine, theirs = _dtypes(out), _dtypes(tiny_rtn_out)
    assert mine.keys() == theirs.keys()
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    floats = {n for n in theirs if n.rpartition(".")[0] not in modules}  # tiny Llama's linears have no bias
    assert {theirs[n] for n in floats} == {torch.float32}
    assert "model.embed_tokens.weight" in floats and "model.norm.weight" in floats
    assert {mine[n] for n in floats} == {torch.bfloat16}
    a, b = ShardedReader(out), ShardedReader(tiny_rtn_out)
    for name in theirs.keys() - floats:  # the quantized tensors: the same bits
        assert mine[name] == theirs[name] and torch.equal(a.get(name), b.get(name)), name
    for name in floats:
        assert torch.equal(a.get(name), b.get(name).to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "dtype" not in json.loads((tiny_rtn_out / "config.json").read_text()) or \
        json.loads((tiny_rtn_out / "config.json").read_text())["dtype"] != "bfloat16"
    run_cli("verify", out)
    logits = load(out, dtype=torch.float32)(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_a_value_beyond_the_range_is_refused_and_nothing_is_left(big_src, tmp_path):
    out = tmp_path / "out"
    res = run_cli("quantize", big_src, "--scheme", "is-w4a8-rtn", "-o", out, "--float-dtype", "float16", "-q", ok=False)
    assert res.exit_code != 0
    line = res.output.strip().splitlines()[-1]
    assert "'model.embed_tokens.weight' holds values beyond float16's range" in line and "1e+05" in line, res.output
    assert "--float-dtype float32 or bfloat16" in line
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    run_cli("quantize", big_src, "--scheme", "is-w4a8-rtn", "-o", out, "--float-dtype", "bfloat16", "-q")
    assert _dtypes(out)["model.embed_tokens.weight"] == torch.bfloat16


def test_unknown_dtype_refused_before_any_work(tiny_llama, tmp_path):
    with pytest.raises(QConvertError, match="unknown --float-dtype 'float8'; known: auto, float16, bfloat16, float32"):
        quantize(tiny_llama, "is-w4a8-rtn", tmp_path / "out", float_dtype="float8", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    res = run_cli("quantize", tiny_llama, "-o", tmp_path / "out", "--float-dtype", "half", ok=False)
    assert res.exit_code == 2 and "'half' is not one of" in res.output


def test_the_card_says_a_gguf_source_was_already_quantized(smollm2, tmp_path):
    """A Q4_1 GGUF's OUT is quantized twice: its report keeps the file's tensor types, and the card says so
    (beside "source weights 98.4 MB", smaller than many OUTs made from it)."""
    from qconvert.hub import _Provenance
    from qconvert.source import provenance

    info = provenance(smollm2)
    assert info["format"].startswith("a GGUF file (tensors: 210 Q4_1, 61 F32, 1 Q8_0), already quantized"), info
    report = {"source": smollm2.description, "source_kind": "gguf", "source_info": info}
    line = " ".join(_Provenance.of(report, {}).source_lines())
    assert "which packs HuggingFaceTB/SmolLM2-135M-Instruct. Its weights are a GGUF file" in line
    assert "qconvert quantizes the result again" in line
    path = _gguf(tmp_path / "f32.gguf", {"a": (np.ones((4, 32), dtype=np.float32), None)})
    from qconvert.source import GGUFSource

    assert GGUFSource(path).weight_format == "a GGUF file (tensors: 1 F32)"


def test_load_on_the_cpu_computes_a_float16_out_in_float32(tiny_llama, tmp_path):
    """qconvert.load(OUT) on the CPU keeps the stored dtype, except float16 (every GGUF-made OUT):
    that computes in float32, as the CLI does on a CPU; bfloat16 stays bfloat16; dtype= overrides."""
    ids = torch.tensor([[1, 2, 3]])
    for name, expected in (("float16", torch.float32), ("bfloat16", torch.bfloat16)):
        out = tmp_path / name
        run_cli("quantize", tiny_llama, "--scheme", "is-w4a8-rtn", "-o", out, "--float-dtype", name, "-q")
        model = load(out)
        assert model.get_input_embeddings().weight.dtype == expected and model(ids).logits.dtype == expected, name
    assert load(tmp_path / "float16", dtype=torch.float16).get_input_embeddings().weight.dtype == torch.float16
