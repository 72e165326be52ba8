"""A third party adds a layout and a method without touching qconvert.

The plugin below is a separate distribution "installed" into a temporary directory (its
package and its ``.dist-info`` with ``entry_points.txt``, found on ``sys.path`` the way pip's
site-packages are): the layout ``toy-int8`` (int8 per-channel weights, weight-only) and the
method ``toy-rtn``.  A tiny model is quantized with a scheme file naming the method, then
loaded, verified against its source and inspected, through the same commands as any preset.
"""

import json
import textwrap

import pytest
import torch

from helpers import run_cli

PLUGIN = '''
import torch
from dataclasses import asdict, dataclass

from qconvert.layouts import Layout, QuantizedModule, TensorSpec
from qconvert.methods.base import Method, QuantizedLinear


class ToyLinear(QuantizedModule):
    def __init__(self, tensors, bias):
        super().__init__()
        self.layout = "toy-int8"
        self.out_features, self.in_features = tensors["q"].shape
        self.register_buffer("q", tensors["q"])
        self.register_buffer("s", tensors["s"])
        self._bias(bias)

    def forward(self, x):
        shape = x.shape
        w = self.q.float() * self.s[:, None]
        return self._finish(x.reshape(-1, shape[-1]).float() @ w.T, x, shape)


class ToyLayout(Layout):
    def spec(self, n, k):
        return {"q": TensorSpec(torch.int8, (n, k), "int8 weights"), "s": TensorSpec(torch.float32, (n,), "scales")}

    def check(self, name, tensors, n, k):
        return [] if (tensors["s"] > 0).all() else [f"{name}.s holds scales <= 0"]

    def module(self, tensors, bias):
        return ToyLinear(tensors, bias)

    def figures(self, row):
        return {"extra": "toy"}


TOY_INT8 = ToyLayout("toy-int8", "int8 per output channel, activations in float")


@dataclass(frozen=True)
class ToyConfig:
    base: str = "rtn"


class ToyMethod(Method):
    name = "toy-rtn"
    config_class = ToyConfig

    def describe(self):
        return {**asdict(self.config), "weights": {"bits": 8}, "activations": {"bits": 16}}

    def quantize_linear(self, name, weight):
        w = weight.float()
        s = (w.abs().amax(dim=1) / 127).clamp_min(1e-8)
        q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedLinear("toy-int8", {"q": q, "s": s}, {"layout": "toy-int8", "shape": list(w.shape), "bits": 8})
'''

ENTRY_POINTS = """\
[qconvert.layouts]
toy-int8 = toyplug:TOY_INT8

[qconvert.methods]
toy-rtn = toyplug:ToyMethod
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "toyplug").mkdir(parents=True)
    (site / "toyplug" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "toyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(site))
    scheme = tmp_path / "toy.toml"
    scheme.write_text('name = "toy"\ndescription = "a third-party scheme"\nmethod = "toy-rtn"\nexclude = ["lm_head"]\n')
    return scheme


def test_a_plugin_layout_and_method_quantize_load_verify_and_inspect(plugin, tiny_llama, tmp_path):
    from qconvert import load
    from qconvert.layouts import available_layouts
    from qconvert.methods import available_methods

    assert "toy-int8" in available_layouts() and "toy-rtn" in available_methods()
    out = tmp_path / "out"
    run_cli("quantize", tiny_llama, "--scheme", plugin, "-o", out, "-q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["modules"].values()) == {"toy-int8"} and qc["method"] == "toy-rtn"
    model = load(out)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ref = load_source(tiny_llama)
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=0.05)  # int8 per channel: close to float
    res = run_cli("verify", out, "--json")
    rep = json.loads(res.stdout)
    assert rep["ok"] and rep["checked_tensors"] > 0 and rep["min_snr_db"] > 30
    table = run_cli("inspect", out).stdout
    assert "toy-int8" in table and "toy" in table


def test_a_damaged_plugin_layer_fails_its_own_check(plugin, tiny_llama, tmp_path):
    from qconvert.formats.native import write_manifest
    from qconvert.formats.safetensors_io import SafetensorsFile, write_safetensors

    out = tmp_path / "out"
    run_cli("quantize", tiny_llama, "--scheme", plugin, "-o", out, "-q")
    f = SafetensorsFile(out / "model.safetensors")
    state = {n: f.get(n).clone() for n in f.keys()}
    state["model.layers.0.mlp.up_proj.s"].neg_()
    write_safetensors(out / "model.safetensors", state)
    (out / "manifest.json").unlink()
    write_manifest(out)
    res = run_cli("verify", out, "--no-compare", ok=False)
    assert res.exit_code == 1 and "model.layers.0.mlp.up_proj.s holds scales <= 0" in res.output


def load_source(path):
    from qconvert.source import resolve_source

    return resolve_source(str(path)).load_model(torch.float32)
