"""How closely the calibration walk's GPTQ inputs agree with the finished model, per architecture:
the figures behind docs/calibration.md ("The block walk") and the bounds of
tests/test_calibration_walk.py and tests/test_phi3.py, measured on tiny random models as the tests
build them (with the tests' AVX2 float kernels, tests/conftest.py).

    python benchmarks/walk_agreement.py [--json PATH]

Prints, for Llama, Phi-3, Gemma-2, Gemma-3, Granite and OLMo-2: the largest relative difference
between the Hessian a GPTQ solve received and the one recomputed from the OUT's forward (the walk
as it is), and the same with the walk broken on purpose (Gemma's block taken for a Llama block;
every layer given the first layer's mask and rotary tables; OLMo-2's output norms skipped;
Granite's residual multiplier left out).  Then the Phi-3 against the Llama that computes the same
function: the fraction of weights on another grid point (largest over the layers), w4a16-gptq's
preset, with --asym-calib 0.25, and against the Llama calibrated on other samples (--seed 1).
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


def _walk(arch: str, patch=None) -> float:
    from _pytest.monkeypatch import MonkeyPatch

    import test_calibration_walk as t

    mp = MonkeyPatch()
    try:
        if patch:
            patch(mp)
        with tempfile.TemporaryDirectory() as d:
            return max(t.walk_errors(arch, Path(d), mp).values())
    finally:
        mp.undo()


def _phi3_against_llama() -> dict:
    from helpers import TEXT, cli_ok, quantize_tiny, tiny_config, write_model
    from qconvert import load
    from test_phi3 import _as_llama, _differing

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "calib.txt").write_text(TEXT)
        phi3 = write_model(d / "src", tiny_config("phi3"))
        llama = _as_llama(phi3, d / "llama")
        runs = {"preset": ((), ()), "asym-calib 0.25": (("--asym-calib", "0.25"),) * 2,
                "other samples (--seed 1)": ((), ("--seed", "1"))}
        got = {}
        for label, (phi_args, llama_args) in runs.items():
            outs = []
            for tag, src, args in (("phi3", phi3, phi_args), ("llama", llama, llama_args)):
                out = d / f"{label.split()[0]}-{tag}"
                cli_ok(quantize_tiny(src, out, "w4a16-gptq", *args))
                outs.append(load(out))
            fractions = _differing(*outs)
            got[label] = {"max": max(fractions), "min": min(fractions)}
        return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from qconvert import block_walk

    llama_roles = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "", "")
    rows = []
    for arch in ("llama", "phi3", "gemma2", "gemma3_text", "granite", "olmo2"):
        row = {"arch": arch, "walk": _walk(arch)}
        if arch.startswith("gemma"):
            row["as a Llama block"] = _walk(arch, lambda mp: mp.setattr(block_walk, "_block_roles", lambda b: llama_roles))
        if arch == "gemma3_text":
            row["first layer's kwargs for all"] = _walk(arch, lambda mp: mp.setattr(
                block_walk.Calibrator, "layer_type", lambda self, i: self.layer_types[0]))
        if arch == "olmo2":
            row["output norms skipped"] = _walk(arch, lambda mp: mp.setattr(
                block_walk, "_block_roles", lambda b: ("", "self_attn", "", "mlp", "", "")))
        if arch == "granite":
            row["residual multiplier left out"] = _walk(arch, lambda mp: mp.setattr(
                block_walk, "_block_parts", lambda b, roles: [getattr(b, a) if a else block_walk._identity for a in roles]))
        rows.append(row)
    print("largest relative Hessian difference, solve against the OUT's forward")
    for row in rows:
        print("  " + "  ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()))
    phi3 = _phi3_against_llama()
    print("Phi-3 against the equal Llama, fraction of weights on another grid point (max / min over layers)")
    for label, v in phi3.items():
        print(f"  {label}: {v['max']:.4f} / {v['min']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"walk": rows, "phi3_vs_llama": phi3}, indent=1))


if __name__ == "__main__":
    main()
