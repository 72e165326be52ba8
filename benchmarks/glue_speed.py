"""Time of a decode step's float glue on a GPU, per Llama-3-8B block, as transformers and the decode
engine compute it against qconvert's kernels: RoPE of q and k (``apply_rotary_pos_emb``: ten small
kernels) against the rope kernel (qconvert_kernels/rope, one launch); an RMSNorm (``LlamaRMSNorm``:
eight) against the norm kernel (qconvert_kernels/norm, one); the MLP's silu(gate) * up (two)
against the swiglu kernel (qconvert_kernels/swiglu, one); the KV-cache write (the engine's two
``index_copy_``) against the kvcache kernel (one).  q, k and v are views of one joined q/k/v
output and gate and up the halves of one joined gate/up output, as a fused W4A8 GPU load hands
them over; the tables come from ``LlamaRotaryEmbedding`` at real positions; the cache holds 4096
columns.  Batch 1 and 16 decode tokens and a 2048-token prefill.  Each time is the median µs per
call over replays of a CUDA graph of calls (qconvert.bench's method), so it is what a captured
decode step pays.  Also checks each kernel against the torch path: rope, swiglu and the cache
write equal bit for bit, the norm kernel within a unit in the last place.
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

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, THETA, INTER = 4096, 32, 8, 128, 500000.0, 14336  # Llama-3-8B
CACHE_LEN = 4096


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


def _bits_equal(got, want) -> bool:
    pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
    return all(torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16)) for a, b in pairs)


def cases(n: int, batch: int, tokens: int):
    """(op, torch path, kernel, check) for one token count: check() compares the two paths' results."""
    import torch.nn.functional as F
    from transformers.models.llama import modeling_llama

    from qconvert_kernels.kvcache import cuda as kkv
    from qconvert_kernels.norm import cuda as kn
    from qconvert_kernels.rope import cuda as kr
    from qconvert_kernels.swiglu import cuda as ks

    apply_rope = modeling_llama.apply_rotary_pos_emb
    apply_rope = getattr(apply_rope, "original", apply_rope)  # transformers' own, not qconvert's dispatcher
    q, k, cos, sin = rope_inputs(batch, tokens)
    yield ("rope", lambda: apply_rope(q, k, cos, sin), lambda: kr.rope(q, k, cos, sin),
           lambda: "bit-exact" if _bits_equal(kr.rope(q, k, cos, sin), apply_rope(q, k, cos, sin)) else "DIFFERS")

    norm = modeling_llama.LlamaRMSNorm(HIDDEN, eps=1e-5).to("cuda", torch.float16)
    x = torch.randn(n, HIDDEN, device="cuda", dtype=torch.float16)

    def norm_check():
        ulps = int((_ordered(norm(x)) - _ordered(kn.rms_norm(x, norm.weight, norm.variance_epsilon))).abs().max())
        return f"max {ulps} ulp"

    yield ("rms_norm", lambda: modeling_llama.LlamaRMSNorm.forward(norm, x),
           lambda: kn.rms_norm(x, norm.weight, norm.variance_epsilon), norm_check)

    gate_up = torch.randn(n, 2 * INTER, device="cuda", dtype=torch.float16) * 3
    gate, up = gate_up[:, :INTER], gate_up[:, INTER:]
    yield ("swiglu", lambda: F.silu(gate) * up, lambda: ks.swiglu(gate, up),
           lambda: "bit-exact" if _bits_equal(ks.swiglu(gate, up), F.silu(gate) * up) else "DIFFERS")

    qkv = torch.randn(batch, tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.float16)
    kv = [qkv[..., (HEADS + i * KV_HEADS) * HEAD_DIM: (HEADS + (i + 1) * KV_HEADS) * HEAD_DIM]
          .view(batch, tokens, KV_HEADS, HEAD_DIM).transpose(1, 2) for i in (0, 1)]
    caches = [torch.zeros(batch, KV_HEADS, CACHE_LEN, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(4)]
    cols = torch.arange(CACHE_LEN - tokens - 1, CACHE_LEN - 1, device="cuda")

    def index_copy(kc, vc):
        kc.index_copy_(2, cols, kv[0])
        vc.index_copy_(2, cols, kv[1])

    def cache_check():
        index_copy(*caches[:2])
        kkv.kv_write(*kv, cols, *caches[2:])
        return "bit-exact" if _bits_equal(tuple(caches[:2]), tuple(caches[2:])) else "DIFFERS"

    yield ("kv_write", lambda: index_copy(*caches[:2]), lambda: kkv.kv_write(*kv, cols, *caches[2:]), cache_check)


def main() -> None:
    from qconvert.bench import environment

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,2048", help="tokens per call: up to 16 as a decode batch, more as one prefill")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times the GPU kernels")
    rows, env = [], environment(torch.device("cuda"))
    for n in (int(v) for v in args.tokens.split(",")):
        batch, tokens = (n, 1) if n <= 16 else (1, n)
        for op, torch_path, kernel, check in cases(n, batch, tokens):
            with torch.inference_mode():
                verdict = check()
                torch_us, mode = _time_us(torch_path)
                kernel_us, _ = _time_us(kernel)
            r = {"op": op, "tokens": n, "batch": batch, "torch_us": round(torch_us, 2), "kernel_us": round(kernel_us, 2),
                 "speedup": round(torch_us / kernel_us, 2), "check": verdict, "timing": mode}
            rows.append(r)
            print(f"{r['op']:>8}  tokens {r['tokens']:>5}  torch {r['torch_us']:>8.2f} us  kernel {r['kernel_us']:>8.2f} us  "
                  f"{r['speedup']:>5.2f}x  {r['check']}  ({r['timing']})", flush=True)
            with open(args.json, "w") as f:  # after each row: a spent time budget keeps the rows done
                json.dump({"environment": env, "shape": "llama3-8b block", "rows": rows}, f, indent=2)
                f.write("\n")
    if any(r["check"] == "DIFFERS" for r in rows):
        raise SystemExit("a kernel differs from its torch path: " + ", ".join(
            f"{r['op']} at {r['tokens']} tokens" for r in rows if r["check"] == "DIFFERS"))


if __name__ == "__main__":
    main()
