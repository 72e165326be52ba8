"""Time of a decode step's float glue on a GPU, per Llama-3-8B block: RoPE of q and k as
transformers computes it (``apply_rotary_pos_emb``: ten small kernels) against the rope kernel
(qconvert_kernels/rope, one launch), and an RMSNorm as transformers computes it (``LlamaRMSNorm``:
eight) against the norm kernel (qconvert_kernels/norm, one).  q and k are views of one joined
q/k/v output, as a fused W4A8 GPU load hands them over; the tables come from
``LlamaRotaryEmbedding`` at real positions.  Batch 1 and 16 decode tokens and a 2048-token
prefill.  Each time is the median µs per call over replays of a CUDA graph of calls (qconvert.bench's
method), so it is what a captured decode step pays.  Also checks each kernel against the torch
path: the rope kernel equal bit for bit, the norm kernel within a unit in the last place.
A benchmark, not a test: prints a table and writes JSON.  Needs cupy and an sm_80+ GPU
(benchmarks/gpu_check.sh, part e).

    python benchmarks/glue_speed.py --json glue.json [--tokens 1,16,2048]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hadamard_speed import _time_us  # noqa: E402  (a CUDA graph of calls, qconvert.bench's method)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, THETA = 4096, 32, 8, 128, 500000.0  # Llama-3-8B


def _ordered(h: torch.Tensor) -> torch.Tensor:
    """fp16 values as integers in the order of the values: adjacent finite values differ by one
    (so a difference is a count of units in the last place, across zero too)."""
    bits = h.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def rope_inputs(batch: int, tokens: int, device: str = "cuda"):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    dev = torch.device(device)
    joined = torch.randn(batch, tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=torch.float16)
    q = joined[..., : HEADS * HEAD_DIM].view(batch, tokens, HEADS, HEAD_DIM).transpose(1, 2)
    k = joined[..., HEADS * HEAD_DIM: (HEADS + KV_HEADS) * HEAD_DIM].view(batch, tokens, KV_HEADS, HEAD_DIM).transpose(1, 2)
    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=THETA,
                      max_position_embeddings=8192)
    start = 0 if tokens > 1 else 700  # a decode token at position 700 .. 715 of its row
    positions = torch.arange(start, start + tokens, device=dev)[None].expand(batch, tokens) + \
        (torch.arange(batch, device=dev)[:, None] if tokens == 1 else 0)
    cos, sin = LlamaRotaryEmbedding(cfg).to(dev)(q, positions)
    return q, k, cos.to(torch.float16), sin.to(torch.float16)


def main() -> None:
    from transformers.models.llama import modeling_llama

    from qconvert.bench import environment
    from qconvert_kernels.norm import cuda as kn
    from qconvert_kernels.rope import cuda as kr

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,2048", help="tokens per call: up to 16 as a decode batch, more as one prefill")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times the GPU kernels")
    apply_rope = modeling_llama.apply_rotary_pos_emb
    apply_rope = getattr(apply_rope, "original", apply_rope)  # transformers' own, not qconvert's dispatcher
    rows, env = [], environment(torch.device("cuda"))
    for n in (int(v) for v in args.tokens.split(",")):
        batch, tokens = (n, 1) if n <= 16 else (1, n)
        q, k, cos, sin = rope_inputs(batch, tokens)
        with torch.inference_mode():
            want = apply_rope(q, k, cos, sin)
            got = kr.rope(q, k, cos, sin)
            equal = all(torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))
                        for a, b in zip(got, want))
            torch_us, mode = _time_us(lambda: apply_rope(q, k, cos, sin))
            kernel_us, _ = _time_us(lambda: kr.rope(q, k, cos, sin))
        rows.append({"op": "rope", "tokens": n, "batch": batch, "torch_us": round(torch_us, 2),
                     "kernel_us": round(kernel_us, 2), "speedup": round(torch_us / kernel_us, 2),
                     "check": "bit-exact" if equal else "DIFFERS", "timing": mode})

        norm = modeling_llama.LlamaRMSNorm(HIDDEN, eps=1e-5).to("cuda", torch.float16)
        x = torch.randn(n, HIDDEN, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            want = _ordered(norm(x))
            got = _ordered(kn.rms_norm(x, norm.weight, norm.variance_epsilon))
            ulps = int((want - got).abs().max())
            torch_us, mode = _time_us(lambda: modeling_llama.LlamaRMSNorm.forward(norm, x))
            kernel_us, _ = _time_us(lambda: kn.rms_norm(x, norm.weight, norm.variance_epsilon))
        rows.append({"op": "rms_norm", "tokens": n, "batch": batch, "torch_us": round(torch_us, 2),
                     "kernel_us": round(kernel_us, 2), "speedup": round(torch_us / kernel_us, 2),
                     "check": f"max {ulps} ulp", "timing": mode})
        for r in rows[-2:]:
            print(f"{r['op']:>8}  tokens {r['tokens']:>5}  torch {r['torch_us']:>8.2f} us  kernel {r['kernel_us']:>8.2f} us  "
                  f"{r['speedup']:>5.2f}x  {r['check']}  ({r['timing']})", flush=True)
        with open(args.json, "w") as f:  # after each token count: a spent time budget keeps the rows done
            json.dump({"environment": env, "shape": "llama3-8b block", "rows": rows}, f, indent=2)
            f.write("\n")
    if any(r["check"] == "DIFFERS" for r in rows):
        raise SystemExit("the rope kernel differs from transformers' RoPE")


if __name__ == "__main__":
    main()
