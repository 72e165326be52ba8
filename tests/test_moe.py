"""Mixtral, Qwen2-MoE and Qwen3-MoE: fused transformers experts <-> per-expert checkpoint linears, quantize, load.

The tiny models use weights of std 0.1 (transformers' default is 0.02): with smaller weights the
router's softmax is nearly uniform and SiLU nearly linear, so swapped gate/up projections or
mis-routed tokens would hardly change any output and no check below could see them.
"""

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from helpers import TEXT, save_pretrained_model, tiny_moe_config
from qconvert import load
from qconvert.cli import cli
from qconvert.moe import ExpertMLP, UnfusedExperts, experts_of, is_router, unfuse_experts
from qconvert.skeleton import build_skeleton, target_linears

KINDS = ("mixtral", "qwen2_moe", "qwen3_moe")
LAYERS = {"mixtral": 2, "qwen2_moe": 3, "qwen3_moe": 3}  # qwen2/3_moe: layer 1 is dense (mlp_only_layers)
EXPERT_LINEARS = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                  "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
BLOCK = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}
# mixtral: 2 blocks x (4 attention + 4 experts x 3); qwen2_moe: 2 MoE blocks x (4 + 12 + 3 shared) + 7 dense;
# qwen3_moe: 2 MoE blocks x (4 + 12) + 7 dense
QUANTIZED = {"mixtral": 32, "qwen2_moe": 45, "qwen3_moe": 39}
# the RTN preset: GPTQ presets need calibration data, which these tests are not about
SCHEME = "is-w4a8-rtn"


def config_of(kind):
    return tiny_moe_config(kind, layers=LAYERS[kind], init_std=0.1)


@pytest.fixture(scope="module", params=KINDS)
def moe_dir(request, tmp_path_factory):
    kind = request.param
    return kind, save_pretrained_model(tmp_path_factory.mktemp(kind) / "src", config_of(kind), tokenizer=True)


def stored_names(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


def stored_state(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def reference(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def batch(vocab=300):
    return torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(0))


def snr_db(a, b):
    return float(10 * torch.log10(b.square().mean() / (a - b).square().mean()))


def test_skeleton_names_are_the_checkpoint_names(moe_dir):
    kind, src = moe_dir
    skel = build_skeleton(config_of(kind))
    params = dict(skel.named_parameters())
    assert set(params) == stored_names(src)  # untied head: every stored tensor, nothing else
    assert set(skel.state_dict()) == set(params)
    assert all(p.is_meta for p in params.values())  # unfusing allocates nothing
    e, h = 4, 64
    inter = 96
    gate, up, down = EXPERT_LINEARS[kind]
    for i in (0, LAYERS[kind] - 1):
        prefix = f"model.layers.{i}.{BLOCK[kind]}"
        assert params[f"{prefix}.gate.weight"].shape == (e, h)  # the router
        for x in range(e):
            assert params[f"{prefix}.experts.{x}.{gate}.weight"].shape == (inter, h)
            assert params[f"{prefix}.experts.{x}.{up}.weight"].shape == (inter, h)
            assert params[f"{prefix}.experts.{x}.{down}.weight"].shape == (h, inter)
    if kind == "mixtral":  # the block moved to the checkpoint's name, the layer's forward still finds it
        layer = skel.model.layers[0]
        assert layer.mlp is layer.block_sparse_moe and "mlp" not in layer._modules
        assert not any(".mlp" in n for n, _ in skel.named_modules())
    else:
        assert "model.layers.1.mlp.gate_proj.weight" in params  # the dense layer is left alone


def test_unfused_skeleton_computes_what_transformers_computes(moe_dir):
    kind, src = moe_dir
    skel = build_skeleton(config_of(kind))
    skel.load_state_dict(stored_state(src), strict=True, assign=True)
    ids = batch()
    a, b = skel(ids).logits, reference(src)(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # a gate/up swap or misroute is off by > 1e-2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_match_the_fused_eager_forward_and_count_tokens(kind, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_of(kind)).to(dtype).eval()
    model.set_experts_implementation("eager")  # the fused module's own forward
    fused_block = copy.deepcopy(model.model.layers[0].mlp)
    fused = fused_block.experts
    x = torch.randn(2, 37, 64).to(dtype)
    want = fused_block(x)
    unfuse_experts(model)
    block = model.model.layers[0].mlp
    assert isinstance(block.experts, UnfusedExperts) and type(block.gate) is type(fused_block.gate)  # router kept
    gate, up, down = EXPERT_LINEARS[kind]
    inter = fused.gate_up_proj.shape[1] // 2
    for e, expert in enumerate(block.experts):  # exact copies; gate is the first half of gate_up_proj
        assert torch.equal(getattr(expert, gate).weight, fused.gate_up_proj[e, :inter])
        assert torch.equal(getattr(expert, up).weight, fused.gate_up_proj[e, inter:])
        assert torch.equal(getattr(expert, down).weight, fused.down_proj[e])
    got = block(x)
    assert got.dtype == want.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)

    _, _, top_k = block.gate(x.reshape(-1, 64))
    counts = block.experts.last_counts
    assert counts.dtype == torch.int64 and counts.shape == (4,)
    assert counts.tolist() == [int((top_k == e).sum()) for e in range(4)] and int(counts.sum()) == 2 * 37 * 2
    block(x)
    assert torch.equal(block.experts.total_counts, 2 * counts)
    block.experts.reset_counts()
    assert block.experts.last_counts is None and int(block.experts.total_counts.sum()) == 0


def test_routers_are_never_targets(moe_dir):
    kind, src = moe_dir
    skel = build_skeleton(config_of(kind))
    targets = target_linears(skel, exclude=("lm_head",))
    assert not any(is_router(n) for n in targets)
    assert not any(n.endswith((".gate", "shared_expert_gate")) for n in targets)
    gate, up, down = EXPERT_LINEARS[kind]
    for i in range(LAYERS[kind]):
        experts = experts_of(skel.model.layers[i])
        if kind in ("qwen2_moe", "qwen3_moe") and i == 1:
            assert experts == [] and "model.layers.1.mlp.gate_proj" in targets  # dense: not a router
            continue
        assert [n for n, _ in experts] == [f"{BLOCK[kind]}.experts.{e}" for e in range(4)]
        assert all(isinstance(m, ExpertMLP) for _, m in experts)
        for e in range(4):
            for lin in (gate, up, down):
                assert f"model.layers.{i}.{BLOCK[kind]}.experts.{e}.{lin}" in targets
    if kind == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert_gate" not in targets
        assert "model.layers.0.mlp.shared_expert.down_proj" in targets
    if kind == "qwen3_moe":
        assert not any("shared_expert" in n for n in targets)
    assert is_router("model.layers.3.block_sparse_moe.gate") and is_router("model.layers.0.mlp.gate")
    assert not is_router("model.layers.0.mlp.gate_proj")


def test_cli_quantize_then_load_tracks_the_original(moe_dir, tmp_path):
    kind, src = moe_dir
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["quantize", str(src), "--scheme", SCHEME, "-g", "32", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert f"{QUANTIZED[kind]} quantized linears" in res.output
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert not any(is_router(m) for m in modules)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f"model.layers.0.{BLOCK[kind]}.gate.weight" in set(f.keys())  # the router, kept in float

    model = load(out)
    ref = reference(src)
    ids = batch()
    inputs = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, y, i=i: inputs.__setitem__(i, (a[0], y)))
             for i, layer in enumerate(ref.model.layers)]
    want = ref(ids).logits
    for h in hooks:
        h.remove()
    # Each MoE block on the reference's own input: 4-bit g32 experts give ~15.5 dB; swapped gate/up,
    # mis-routed tokens or experts loaded under each other's names give 7 dB or much less.
    for i, (x, y) in inputs.items():
        assert snr_db(model.model.layers[i].mlp(x), y) > 12, f"{kind} block {i}"
    got = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.9, f"{kind}: logits cosine {cos:.3f}"  # ~0.95 here; misplaced experts give ~0.7


def test_gptq_calibrates_every_expert_and_falls_back_when_starved(moe_dir, tmp_path, caplog):
    """is-w4a8 (GPTQ) on an MoE model: every expert gets statistics; starved ones from all tokens."""
    kind, src = moe_dir
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="qconvert"):
        res = CliRunner().invoke(cli, ["quantize", str(src), "--scheme", "is-w4a8", "-g", "32", "-o", str(out), "-q",
                                       "--calib", "file", "--data-file", str(text), "--nsamples", "4", "--seqlen", "32"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    layers = json.loads((out / "qconvert.json").read_text())["layers"]
    experts = [r for r in layers if ".experts." in r["name"]]
    assert experts and all(r["gptq_loss"] < r["rtn_loss"] for r in layers)
    # 128 tokens, top-2 of 4 experts: about 64 each, fewer than the 96 inputs of w2 -> all tokens
    starved = [r for r in experts if r["calib_fallback"]]
    assert starved and all(r["calib_rows"] == 128 for r in starved)
    assert all(r["calib_rows"] < 128 for r in experts if not r["calib_fallback"])
    assert any("fewer than its" in m and "all calibration tokens" in m for m in caplog.messages)
    model = load(out)
    cos = torch.nn.functional.cosine_similarity(model(batch()).logits.flatten(), reference(src)(batch()).logits.flatten(), dim=0)
    assert cos > 0.9, f"{kind}: logits cosine {cos:.3f}"
