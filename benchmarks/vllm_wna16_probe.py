"""How far vLLM's CPU W4A16 kernel puts a layer's outputs from x·Wᵀ of the weights it loaded: the
figure behind tests/test_vllm.py's ``W4A16_CPU_TOL``.  Runs in vLLM's environment (.ci/vllm_env.sh),
on a compressed-tensors W4A16 export (symmetric, ``uint4b8``):

    VENV/bin/python benchmarks/vllm_wna16_probe.py EXPORT_DIR [--layers 0] [--rows 5] [--json F]

For each quantized linear of the chosen decoder layers, vLLM's module (after loading and repacking)
runs ``rows`` random bfloat16 inputs; the reference is the same inputs times the weights decoded
from the export's files in float64 (vLLM's own unpacking), and, to separate the weights' bfloat16
rounding, times those weights rounded to bfloat16.  Prints the relative error (Frobenius norm) of
each; bfloat16 rounding of the outputs alone gives about 0.2%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

for _k, _v in {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--layers", default="0", help="decoder layers to probe, comma-separated")
    ap.add_argument("--rows", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch
    from safetensors import safe_open
    from vllm import LLM, __version__
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    tensors = {}
    for f in sorted(args.export.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})

    def decoded(name: str) -> torch.Tensor:  # [N, K] float64
        if name + ".weight_zero_point" in tensors:
            sys.exit(f"{name} has zero points: this probe reads symmetric exports only")
        w = unpack_quantized_values_into_int32(tensors[name + ".weight_packed"].t().contiguous(), scalar_types.uint4b8, 0)
        s = tensors[name + ".weight_scale"].t().double()
        return ((w - scalar_types.uint4b8.bias).double() * s.repeat_interleave(w.shape[0] // s.shape[0], 0)).t()

    layers = {int(i) for i in args.layers.split(",")}
    llm = LLM(model=str(args.export), dtype="bfloat16", enforce_eager=True, max_model_len=256, max_num_seqs=2, seed=0)

    def probe(model):
        rows = []
        for name, mod in model.named_modules():
            parts = name.split(".")
            at = parts.index("layers") + 1 if "layers" in parts else len(parts)
            if at >= len(parts) or not parts[at].isdigit() or int(parts[at]) not in layers:
                continue
            ours = "model." + name.split("model.", 1)[-1]
            if ours + ".weight_packed" not in tensors:
                continue  # a fused vLLM module (qkv_proj, gate_up_proj): its parts are separate in the file
            w = decoded(ours)
            torch.manual_seed(0)
            x = torch.randn(args.rows, w.shape[1]).to(torch.bfloat16)
            y = mod(x)
            y = (y[0] if isinstance(y, tuple) else y).double()
            exact, rounded = x.double() @ w.t(), x.double() @ w.to(torch.bfloat16).double().t()
            rows.append({"layer": ours, "n": w.shape[0], "k": w.shape[1],
                         "rel_err": float((y - exact).norm() / exact.norm()),
                         "rel_err_bf16_weights": float((y - rounded).norm() / rounded.norm())})
        return rows

    rows = llm.apply_model(probe)[0]
    print(f"vLLM {__version__} CPU W4A16 kernel against x·Wᵀ (bfloat16 inputs, {args.rows} rows)")
    print(f"{'layer':42} {'N x K':>11} {'rel. error':>10} {'vs bf16 W':>10}")
    for r in rows:
        print(f"{r['layer']:42} {str(r['n']) + ' x ' + str(r['k']):>11} {r['rel_err']:10.4f} {r['rel_err_bf16_weights']:10.4f}")
    if args.json:
        args.json.write_text(json.dumps({"vllm_version": __version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
