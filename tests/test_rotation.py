"""Residual-stream rotations (qconvert.solvers.rotation): exact orthogonal matrices, and a rotated
checkpoint that computes what the original computes.

The equality test compares float32 logits: rotating is exact in real arithmetic, so what differs
is float32 rounding only, of the stored weights (2^-24 relative) and of matmuls that now sum in
another order; through two tiny layers that stays near 1e-6 of the largest logit.  A mistake
(a norm not folded, a transposed Q, V and O rotated by different R) changes the function, by
10 % of the largest logit or more (``test_tolerance_separates_right_from_wrong``).  The tolerance
1e-4 * max|logit| sits between the two.  The tiny models have weights of std 0.1 and norm
weights and biases far from their defaults, so that every path (attention, MLP, routers, a
final norm folded into the head) moves the logits.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import ARCH, MOE
from qconvert.errors import QConvertError
from qconvert.skeleton import build_skeleton
from qconvert.solvers.rotation import (
    Rotation,
    RotatedSource,
    derived_seed,
    hadamard,
    hadamard_factors,
    has_hadamard,
    random_orthogonal,
    randomized_hadamard,
)
from qconvert.source import Source, SafetensorsDirSource

TOL = 1e-4  # of max |logit|; see the module docstring

# hidden 48 = 12 x 2 x 2 and head_dim 12 take Paley matrices, not only Sylvester's
DENSE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=120, max_position_embeddings=64, initializer_range=0.1)
EXTRA = {"mistral": dict(sliding_window=None), "qwen3": dict(head_dim=12), "mixtral": MOE["mixtral"],
         "qwen2_moe": {**MOE["qwen2_moe"], "moe_intermediate_size": 40, "shared_expert_intermediate_size": 56},
         "qwen3_moe": {**MOE["qwen3_moe"], "moe_intermediate_size": 40, "head_dim": 12},
         "phi3": {k: v for k, v in ARCH["phi3"].items() if k.endswith("token_id")},  # its own pad id: past this vocabulary
         "granite": {k: v for k, v in ARCH["granite"].items() if k.endswith(("multiplier", "scaling"))}}
LAYERS = {"qwen2_moe": 3, "qwen3_moe": 3}  # layer 1 is dense (mlp_only_layers): both MLP kinds in one model


def config_of(kind: str, tie: bool = False, **over):
    kw = {**DENSE, "num_hidden_layers": LAYERS.get(kind, 2), **EXTRA.get(kind, {}), "tie_word_embeddings": tie, **over}
    return AutoConfig.for_model(kind, **kw)


def write_checkpoint(directory, config, dtype=torch.float32, final_norm_ones=False):
    """A random model of ``config`` saved by transformers (its on-disk names), with every norm
    weight and bias moved away from 1 and 0 so that folding them matters."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = 1 + 0.3 * torch.randn_like(p)
        elif name.endswith(".bias"):
            p.data = 0.1 * torch.randn_like(p)
    if final_norm_ones:
        model.model.norm.weight.data.fill_(1.0)
    model.to(dtype).save_pretrained(directory)
    return SafetensorsDirSource(directory)


def materialize(src: Source) -> torch.nn.Module:
    """The checkpoint ``src`` reads, as a transformers model (float32), built by load_state_dict."""
    cfg = src.config
    model = build_skeleton(cfg)
    state = {k: src.get(k).float() for k in src.keys()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set()), (missing, unexpected)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def tokens(vocab=120):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def reference_logits(directory, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).float().eval()
    return model(tokens()).logits


def rel_error(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


# ---- the matrices --------------------------------------------------------------------------

def flat(h) -> bool:
    """Every entry is +-1/sqrt(n), to float64 rounding."""
    return float((h.abs() * h.shape[0] ** 0.5 - 1).abs().max()) <= 1e-12


SUPPORTED_SMALL = [n for n in range(2, 257) if has_hadamard(n)]
MODEL_SIZES = [576, 768, 896, 1024]  # SmolLM2, GPT-2-like, Qwen2-0.5B; larger ones below


def test_which_orders_exist():
    # all multiples of 4 up to 256 except these (they need Williamson-type or other constructions)
    assert [n for n in range(4, 257, 4) if not has_hadamard(n)] == [92, 116, 156, 172, 184, 188, 232, 236]
    assert [n for n in range(1, 257) if has_hadamard(n) and n % 4] == [1, 2]
    for n in (576, 768, 896, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 8192, 64, 80, 96, 128):
        assert has_hadamard(n), n  # hidden sizes and head_dims of Llama, Mistral, Qwen2/3, SmolLM2
    assert hadamard_factors(576) == (12, 12, 2, 2) and hadamard_factors(896) == (28, 2, 2, 2, 2, 2)
    assert hadamard_factors(4096) == (2,) * 12 and hadamard_factors(36) == (36,)  # Paley II, q = 17
    assert hadamard_factors(52) == (52,) and hadamard_factors(28) == (28,)  # GF(25) and GF(27)


@pytest.mark.parametrize("n", SUPPORTED_SMALL + MODEL_SIZES)
def test_hadamard_is_orthonormal_with_flat_entries(n):
    h = hadamard(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert flat(h)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [3584, 4096])  # Qwen2-7B (28 x 2^7), Llama (2^12)
def test_large_hadamard_rows_are_orthonormal(n):
    h = hadamard(n)
    assert flat(h)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:24]  # each against all n rows
    assert torch.allclose(h[rows] @ h.T, torch.eye(n, dtype=torch.float64)[rows], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 12, 48, 576, 896])
def test_fast_product_equals_the_dense_matrix(n):
    rot = Rotation.hadamard(n, seed=5, what="test")
    dense = randomized_hadamard(n, 5)
    assert torch.allclose(rot.matrix(), dense, rtol=0, atol=1e-14)
    x = torch.randn(3, 7, n, dtype=torch.float64)
    assert torch.allclose(rot.right(x), x @ dense, rtol=0, atol=1e-12)


def test_random_matrices_are_orthogonal_and_follow_the_seed():
    for make in (random_orthogonal, randomized_hadamard):
        a, b, c = make(48, 7), make(48, 7), make(48, 8)
        assert torch.allclose(a @ a.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(a, b) and not torch.equal(a, c)
    # the per-head seed is a fixed function of the seed, not of the platform
    assert derived_seed(0, "per-head") == derived_seed(0, "per-head") != derived_seed(1, "per-head")


@pytest.mark.parametrize("n", [92, 6, 7, 2 * 92])
def test_unsupported_order_says_what_to_do(n):
    with pytest.raises(QConvertError, match=rf"order {n} .*--rotate random"):
        hadamard(n)


# ---- the rotated checkpoint ------------------------------------------------------------------

CASES = [  # (model type, tied embeddings, mode)
    ("llama", False, "hadamard"),
    ("llama", True, "hadamard"),
    ("mistral", False, "random"),
    ("qwen2", False, "hadamard"),  # q/k/v biases
    ("qwen2", True, "random"),
    ("qwen3", True, "hadamard"),  # q_norm/k_norm
    ("mixtral", False, "hadamard"),
    ("qwen2_moe", False, "random"),  # shared expert, its gate, a dense layer
    ("qwen3_moe", True, "hadamard"),  # q_norm/k_norm, renormalized top-k, a dense layer
    ("phi3", False, "hadamard"),  # q, k, v in one qkv_proj; gate and up in one gate_up_proj
    ("phi3", True, "random"),
    ("granite", True, "hadamard"),  # embedding, residual, attention and logit multipliers
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(kind, tie, dtype=torch.float32, final_norm_ones=False):
        key = (kind, tie, dtype, final_norm_ones)
        if key not in made:
            d = tmp_path_factory.mktemp(f"{kind}-{'tied' if tie else 'untied'}")
            made[key] = write_checkpoint(d, config_of(kind, tie), dtype, final_norm_ones)
        return made[key]

    return get


@pytest.mark.parametrize("kind,tie,mode", CASES)
def test_rotated_model_computes_the_same_logits(checkpoints, kind, tie, mode):
    src = checkpoints(kind, tie)
    rot = RotatedSource(src, mode, seed=3)
    want = reference_logits(src.directory)
    got = materialize(rot)(tokens()).logits
    assert rel_error(got, want) <= TOL
    # the checkpoint did change: norms folded away, the embedding rotated
    names = rot.keys()
    norms = [n for n in names if n.endswith("layernorm.weight") or n == "model.norm.weight"]
    assert norms and all(torch.equal(rot.get(n), torch.ones_like(src.get(n))) for n in norms)
    assert rel_error(rot.get("model.embed_tokens.weight"), src.get("model.embed_tokens.weight")) > 0.1
    assert rot.untied == tie and rot.config.tie_word_embeddings is False  # the final norm is not all ones
    assert ("lm_head.weight" in names) and ("lm_head.weight" in src.keys()) == (not tie)
    assert src.config.tie_word_embeddings == tie  # the source's own config is untouched
    assert all(rot.info(n) == src.info(n) for n in src.keys())


def test_load_model_is_the_materialized_model(checkpoints):
    rot = RotatedSource(checkpoints("mixtral", False), "hadamard", seed=0)
    a = rot.load_model()(tokens()).logits
    b = materialize(rot)(tokens()).logits
    assert torch.equal(a, b)


def test_tied_head_stays_tied_when_the_final_norm_is_all_ones(checkpoints):
    src = checkpoints("llama", True, final_norm_ones=True)
    rot = RotatedSource(src, "hadamard", seed=0)
    assert not rot.untied and rot.config.tie_word_embeddings and "lm_head.weight" not in rot.keys()
    assert rel_error(materialize(rot)(tokens()).logits, reference_logits(src.directory)) <= TOL
    assert rot.describe()["untied"] is False


def test_tolerance_separates_right_from_wrong(checkpoints):
    """Seed 3's model with one layer's v_proj from seed 4: a V/O rotation mismatch, far outside TOL."""
    src = checkpoints("llama", False)
    good, other = RotatedSource(src, "hadamard", seed=3), RotatedSource(src, "hadamard", seed=4)
    model = materialize(good)
    model.model.layers[1].self_attn.v_proj.weight.data = other.get("model.layers.1.self_attn.v_proj.weight")
    assert rel_error(model(tokens()).logits, reference_logits(src.directory)) > 100 * TOL


def test_phi3_value_rows_of_qkv_proj_take_the_per_head_rotation(checkpoints):
    """Phi-3's fused qkv_proj: with the value rows (the last kv_heads x head_dim) from another
    seed's per-head rotation, or left without it, the function changes far beyond TOL; with all
    three blocks from the right recipe it does not (test_rotated_model_computes_the_same_logits)."""
    src = checkpoints("phi3", False)
    good, other = RotatedSource(src, "hadamard", seed=3), RotatedSource(src, "hadamard", seed=4)
    name = "model.layers.1.self_attn.qkv_proj.weight"
    v0 = (good.heads + good.kv_heads) * good.head_dim
    want = reference_logits(src.directory)
    for wrong in (other.get(name)[v0:],  # another per-head R (and another Q)
                  _map_rows_read(good, src.get(name)[v0:], "model.layers.1.input_layernorm.weight")):  # no R at all
        model = materialize(good)
        model.model.layers[1].self_attn.qkv_proj.weight.data[v0:] = wrong
        assert rel_error(model(tokens()).logits, want) > 100 * TOL
    bad = RotatedSource(DictSource({**{k: src.get(k) for k in src.keys()}, name: src.get(name)[:-1]}, src.config), "random", 0)
    with pytest.raises(QConvertError, match="qkv_proj.weight' of .* has 95 rows, not the 96"):
        bad.get(name)


def _map_rows_read(rot, rows, norm):
    """``rows diag(g) Q``: the value rows as a reading linear without the per-head rotation."""
    return (rot.q.right(rows.to(torch.float64) * rot._gain(norm))).to(rows.dtype)


def test_bfloat16_stays_bfloat16(checkpoints):
    src = checkpoints("qwen2", True, dtype=torch.bfloat16)
    rot = RotatedSource(src, "hadamard", seed=0)
    assert all(rot.get(n).dtype == torch.bfloat16 for n in rot.keys())
    # the rotated weights are rounded to bfloat16 once more (2^-9 relative): a looser bound
    assert rel_error(materialize(rot)(tokens()).logits, reference_logits(src.directory, torch.bfloat16)) <= 3e-2


def test_same_seed_same_bytes_other_seed_other_bytes(checkpoints):
    src = checkpoints("qwen2_moe", False)
    for mode in ("hadamard", "random"):
        a, b, c = (RotatedSource(src, mode, seed=s) for s in (11, 11, 12))
        for name in a.keys():
            x, y = a.get(name), b.get(name)
            assert x.numpy().tobytes() == y.numpy().tobytes(), name
        assert not torch.equal(a.get("model.embed_tokens.weight"), c.get("model.embed_tokens.weight"))
        assert not torch.equal(a.get("model.layers.0.self_attn.o_proj.weight"), c.get("model.layers.0.self_attn.o_proj.weight"))


def test_embedding_and_head_stream_in_slices(checkpoints):
    src = checkpoints("llama", True)
    rot = RotatedSource(src, "hadamard", seed=0, chunk_bytes=48 * 8 * 16)  # 16 rows of float64 at a time
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        parts = list(rot.iter_rows(name))
        assert len(parts) == -(-120 // 16) and all(p.shape[1] == 48 and p.dtype == torch.float32 for p in parts)
        torch.testing.assert_close(torch.cat(parts), rot.get(name), rtol=1e-6, atol=1e-7)
    for name in ("model.layers.0.self_attn.v_proj.weight", "model.norm.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(torch.cat(list(rot.iter_rows(name))), rot.get(name))


def test_describe(checkpoints):
    d = RotatedSource(checkpoints("llama", True), "hadamard", seed=9).describe()
    assert d["mode"] == "hadamard" and d["seed"] == 9 and d["untied"] is True
    assert d["residual"] == "randomized Hadamard 48 = 12 x 2 x 2" and "randomized Hadamard 12" in d["per_head"]
    assert d["folded_norms"] == 2 * 2 + 1


# ---- refusals ------------------------------------------------------------------------------

def test_hidden_size_without_hadamard_asks_for_random(tmp_path):
    src = write_checkpoint(tmp_path / "m", config_of("llama", hidden_size=92, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(QConvertError, match=r"order 92 \(the hidden size of .*--rotate random"):
        RotatedSource(src, "hadamard", seed=0)
    rot = RotatedSource(src, "random", seed=0)
    assert rel_error(materialize(rot)(tokens()).logits, reference_logits(src.directory)) <= TOL


class DictSource(Source):
    def __init__(self, state, config):
        self.state, self._config, self.description = state, config, "a test dict"

    @property
    def config(self):
        return self._config

    def keys(self):
        return list(self.state)

    def get(self, name):
        return self.state[name]

    def info(self, name):
        return self.state[name].dtype, tuple(self.state[name].shape)


def test_refusals():
    cfg = config_of("llama")
    state = {k: torch.zeros(v.shape) for k, v in build_skeleton(cfg).state_dict().items()}
    with pytest.raises(QConvertError, match="unknown rotation 'spin'; known: hadamard, random"):
        RotatedSource(DictSource(state, cfg), "spin", 0)
    with pytest.raises(QConvertError, match="seed -1"):
        RotatedSource(DictSource(state, cfg), "random", -1)
    with pytest.raises(QConvertError, match="'model.layers.0.self_attn.extra.weight'"):
        RotatedSource(DictSource({**state, "model.layers.0.self_attn.extra.weight": torch.zeros(2, 48)}, cfg), "random", 0)
    gemma = AutoConfig.for_model("gemma", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    with pytest.raises(QConvertError, match="model type 'gemma'"):
        RotatedSource(DictSource(state, gemma), "random", 0)
    missing = {k: v for k, v in state.items() if k != "model.layers.1.post_attention_layernorm.weight"}
    with pytest.raises(QConvertError, match="post_attention_layernorm"):
        RotatedSource(DictSource(missing, cfg), "random", 0)


# ---- through the conversion ------------------------------------------------------------------

def test_preset_default_rotation_and_its_fallback(tmp_path):
    """is-w4a8, w4a8-fs, w4a16-gptq and w8a8 rotate by default, the I-LLM presets with the online
    transform too (chosen by measurement, docs/accuracy.md); ``rotate="none"`` turns it off,
    and ``--base rtn`` skips it.  A model the rotation does not support is quantized unrotated
    under the default, the reason announced, reported and on the card; an explicit ``--rotate`` on
    it stops and writes nothing."""
    import json

    from helpers import TEXT, tiny_config, write_model
    from qconvert.calibration_text import CalibSettings
    from qconvert.hub import model_card
    from qconvert.pipeline import quantize
    from qconvert.schemes_registry import list_presets

    defaults = {s.name: s.rotate for s in list_presets()}
    online = {"illm-w4a4", "illm-w4a8", "illm-w8a8"}
    rotated = {"is-w4a8", "w4a8-fs", "w4a16-gptq", "w4a16-gptq-zp", "w8a8", *online}
    assert {n for n, r in defaults.items() if r != "none"} == rotated
    assert {defaults[n] for n in rotated - online} == {"hadamard"} and {defaults[n] for n in online} == {"hadamard+online"}

    def report(out):
        return json.loads((out / "qconvert.json").read_text())

    cfg = tiny_config(tie=True)
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()
             if k != "lm_head.weight"}
    state["model.norm.weight"] += 0.5  # a final norm that is not all ones: the rotation unties the head
    src = SafetensorsDirSource(write_model(tmp_path / "m", cfg, state))
    (tmp_path / "calib.txt").write_text(TEXT)
    calib = CalibSettings("file", str(tmp_path / "calib.txt"), nsamples=4, seqlen=32)
    lines = []
    out = quantize(str(src.directory), "is-w4a8", tmp_path / "rot", progress=False, group_size=16, calib=calib,
                   announce=lines.append)
    assert report(out)["rotation"]["mode"] == "hadamard" and "rotation_skipped" not in report(out)
    vocab, hidden = src.info("model.embed_tokens.weight")[1]
    assert f"lm_head untied from the embedding (+{vocab * hidden * 4 / 1e6:,.1f} MB in float32; " in lines[0]
    plain = quantize(str(src.directory), "is-w4a8", tmp_path / "plain", progress=False, group_size=16, calib=calib,
                     rotate="none")
    assert "rotation" not in report(plain) and "rotation_skipped" not in report(plain)
    lines = []
    rtn = quantize(str(src.directory), "is-w4a8", tmp_path / "rtn", progress=False, base="rtn", group_size=16,
                   announce=lines.append)  # measured: round-to-nearest lost accuracy rotated, so no default there
    assert "rotation" not in report(rtn) and "--base rtn was asked" in report(rtn)["rotation_skipped"] in lines[0]
    forced = quantize(str(src.directory), "is-w4a8", tmp_path / "forced", progress=False, base="rtn", group_size=16,
                      rotate="hadamard")
    assert report(forced)["rotation"]["mode"] == "hadamard"

    odd = SafetensorsDirSource(write_model(tmp_path / "m92", tiny_config(hidden=92, heads=2, kv_heads=1)))
    lines = []
    out = quantize(str(odd.directory), "is-w4a8", tmp_path / "odd", progress=False, group_size=4, calib=calib,
                   announce=lines.append)
    why = report(out)["rotation_skipped"]
    assert "rotation" not in report(out) and why.startswith("not rotated: is-w4a8's default --rotate hadamard")
    assert "order 92" in why and why in lines[0] and str(odd.directory) in why
    card = model_card(out)  # the card shows the local source as path/to/NAME, there too
    assert why.replace(str(odd.directory), "path/to/m92") in card and str(tmp_path) not in card
    with pytest.raises(QConvertError, match=r"order 92 .*--rotate random"):
        quantize(str(odd.directory), "is-w4a8", tmp_path / "odd2", progress=False, base="rtn", group_size=4,
                 rotate="hadamard")
    assert not (tmp_path / "odd2").exists() and not (tmp_path / "odd2.partial").exists()


def test_default_online_transform_falls_back_to_offline(tmp_path):
    """illm-w4a4's default ``hadamard+online`` on a model whose intermediate size (90) has no
    Hadamard order: rotated offline only, and the quantize line, the report, ``inspect`` and the
    card say why; an explicit ``--rotate hadamard+online`` stops with the reason and writes nothing."""
    import json

    from click.testing import CliRunner
    from helpers import TEXT, quantize_tiny, tiny_config, write_model
    from qconvert.cli import cli
    from qconvert.hub import model_card

    src = write_model(tmp_path / "m90", tiny_config(intermediate=90))
    (tmp_path / "calib.txt").write_text(TEXT)
    res = quantize_tiny(src, tmp_path / "o", "illm-w4a4")
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((tmp_path / "o" / "qconvert.json").read_text())
    why = report["rotation_skipped"]
    assert why.startswith("online transform skipped: illm-w4a4's default --rotate hadamard+online")
    assert "order 90" in why and why.endswith("rotated offline only")
    assert report["rotation"]["mode"] == "hadamard" and "online" not in report["rotation"]
    assert "online_rotation" not in json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert "residual stream rotated (hadamard, seed 0)" in res.output and why in res.output
    card = model_card(tmp_path / "o")  # the local source as path/to/NAME
    assert f"| online rotation | {why.replace(str(src), 'path/to/m90')} |" in card and str(tmp_path) not in card
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "o")])
    assert "rotated before quantization: hadamard, seed 0" in shown.output and why in shown.output
    res = quantize_tiny(src, tmp_path / "o2", "illm-w4a4", "--rotate", "hadamard+online")
    assert res.exit_code != 0 and "no online Hadamard transform of order 90" in res.output
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.partial").exists()


def test_quantize_reads_a_rotated_source(checkpoints, tmp_path):
    """The pipeline takes a RotatedSource as any Source: the untied head is stored, the norms are ones."""
    from safetensors import safe_open

    from qconvert.pipeline import quantize

    rot = RotatedSource(checkpoints("llama", True), "hadamard", seed=0)
    out = quantize(rot, "is-w4a8-rtn", tmp_path / "out", progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), rot.get("lm_head.weight"))
        assert torch.equal(f.get_tensor("model.norm.weight"), torch.ones(48))
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), rot.get("model.embed_tokens.weight"))


def test_quantize_rotate_end_to_end(tiny_calib_src, tmp_path, monkeypatch):
    """``quantize --rotate hadamard`` on a calibrated scheme: the report and the card say so, verify
    compares each layer with the rotated source it was made from (and fails without that), and
    an unknown rotation is a usage error that writes nothing."""
    import json

    from click.testing import CliRunner

    from qconvert import verify as verify_mod
    from qconvert.cli import cli
    from qconvert.hub import model_card

    calib = ["--calib", "file", "--data-file", str(tiny_calib_src.parent / "calib.txt"), "--nsamples", "4",
             "--seqlen", "32"]
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["quantize", str(tiny_calib_src), "--scheme", "is-w4a8", "--rotate", "hadamard",
                                   "--rotate-seed", "3", "-g", "32", "-o", str(out), "-q", *calib])
    assert res.exit_code == 0, res.output
    assert "residual stream rotated (hadamard, seed 3)" in res.output
    rot = json.loads((out / "qconvert.json").read_text())["rotation"]
    assert rot["mode"] == "hadamard" and rot["seed"] == 3
    card = model_card(out)
    assert "hadamard-rotation" in card and "residual stream rotated before quantization (hadamard, seed 3)" in card

    rep = verify_mod.verify(out, against=str(tiny_calib_src), save=False)
    assert rep.ok, rep.failures
    monkeypatch.setattr(verify_mod, "rotated_as_recorded", lambda o, src: src)  # compare with the unrotated source
    wrong = verify_mod.verify(out, against=str(tiny_calib_src), save=False)
    assert not wrong.ok and wrong.min_snr_db < rep.min_snr_db - 10, (wrong.min_snr_db, rep.min_snr_db)

    exp = CliRunner().invoke(cli, ["export", str(out), "-o", str(tmp_path / "ct")])
    assert exp.exit_code == 0, exp.output
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] and json.loads((out / "config.json").read_text())["hidden_size"] == 64

    bad = CliRunner().invoke(cli, ["quantize", str(tiny_calib_src), "--scheme", "is-w4a8", "--rotate", "bogus",
                                   "-o", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "bogus" in bad.output and not (tmp_path / "o2").exists()
