"""Layouts ``illm-w8a8``, ``illm-w4a8``, ``illm-w4a4`` (I-LLM) and their integer-only runtime.

Stored per linear (docs/format.md): ``qweight`` (w8: int8 [N, K]; w4: uint8 [N, ceil(K/2)], two
int4 per byte), ``shape`` int64 [2], ``wm`` int32 [N] and ``wk`` int32 [N] (the weight scale of
each output channel as the dyadic wm / 2^wk, wm < 2^16), ``smooth`` float32 [K] and
``out_smooth`` float32 [N] (the smoothing folded into the layer's inputs and rows, kept for the
float diagnostics).  ``qconvert.load`` builds the whole-model integer runtime below
(``ILLMLayout.model_runtime``); ``load(OUT, integer=False)`` the float model with these linears.

``IntegerLlama.forward_int(ids)`` runs a Llama-architecture model from the embedding lookup to
the logits with integer tensors and integer operations only (qconvert_kernels/illm/reference.py
has the operators); ``logits`` (and ``forward``, the rows as one batch) then converts the integer
logits to float once, the single float operation per output.  tests/test_illm.py proves it by
tracing every torch call between the two.

Per block, with every activation an integer tensor and a per-token dyadic scale:

    h (residual, |h| <= 2^20) --DI-Norm--> int8 (a4: int4) per token --DI-MatMul--> q, k, v
    q, k -> int16 per token -> integer RoPE -> q int8 per token, k int8 per head and token
    v -> int8 per head and token;  scores = q k^T (int32) x each key's scale (folded by shifts to
    the row's largest) -> DI-ClippedSoftmax -> P (15-bit) x each value's scale, requantized to
    15 bits per row -> P v (int64); heads aligned to one scale -> int8 per token -> o_proj ->
    residual add (rescaled by shifts).  No scale spans tokens, so the model is causal: a token's
    logits do not depend on the tokens after it (until 2026-12-03 k and v were int8 per head over
    the whole sequence, which let every position see the ranges of later keys and values)
    DI-Norm -> gate, up -> int16 per token -> integer SiLU(gate) * up [-> integer Hadamard]
    -> int8 per token -> down_proj -> residual add;
    final DI-Norm -> lm_head (int8 per row, the embedding table when tied)

Constants of the model are made integer once at load time from the stored tensors: the norm
weights (smoothing folded in by the converter) become int16 mantissas with one exponent per
norm, the embedding and lm_head int8 rows with a dyadic scale per row, the rotary table integers
with scale 2^-14 (reference_illm.rope_table).  Perplexity and verification run whole sequences;
generation keeps the int8 keys and values in a KV cache (qconvert/layouts/illm_cache.py), which
gives the bits of the whole sequence run again.

On a GPU (``load(OUT, device="cuda")``) the same integer model runs with the I-LLM kernels for
DI-Norm, the requantizations (with the per-row scale products that follow them; q, k and v
through 16 bits and RoPE in one kernel each, a captured step's keys and values written straight
into its cache), DI-MatMul, the SwiGLU, the online Hadamard transform, the residual adds (each
with the DI-Norm after it, one launch), attention and the heads' alignment to one exponent per
token (``IntegerLlama.use_kernels``), torch integer ops on the GPU for the rest (the other cache
writes, masks, the head); the results are the same bits
(tests/test_illm_runtime_kernels.py runs the kernels on their CPU emulator).

An OUT quantized with ``--rotate hadamard+online`` has down_proj's weights folded with the
orthogonal Q = (A (x) H) / sqrt(n): its input is transformed per token in integers
(``ri.hadamard_rows``: sums and differences) and 1 / sqrt(n) joins the dyadic scale; the smoothing
of that input is off then (it would act before Q, where the folded weight cannot follow it).

``act_clip`` (the method's recorded config; 1 when absent): every linear's per-token input is
quantized over max |x| times c instead of max |x| (c as the integer ``ri.clip_int(c)`` = round(c *
2^16), shifts only; ``ri.quantize_rows``), in the two DI-Norms of each block (not the final norm
before the head), before o_proj and before down_proj.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from qconvert.errors import QConvertError
from qconvert.formats.packing import unpack_int4
from qconvert.layouts.base import Layout, NotExportable, QuantizedModule, TensorSpec, finite_positive, shape_check
from qconvert.layouts.derived import CACHE, DerivedHolder
from qconvert.layouts.illm_cache import IntegerDecodeEngine, IntegerKVCache, SequenceCache, StaticSequenceCache
from qconvert_kernels.illm import cuda as cuda_illm
from qconvert_kernels.illm import reference as ri
from qconvert_kernels.illm.reference import Dyadic

# attention's int64 scores per block of heads and rows: on the CPU a block that stays in cache
# (SmolLM2, 512 tokens, 2 AVX-512 cores, float32 GEMMs: 6-8 s per forward in 4 MiB blocks, 12-14 s
# with every head in one block), on a GPU as much as a launch can use
ATTN_BLOCK_BYTES = {"cpu": 1 << 22, "cuda": 1 << 28}
# the tokens one batched pass of the integer model takes (IntegerLlama.logits runs more rows in
# parts): its activations are int64, [tokens, intermediate] at the widest.  On the CPU, parts that
# stay in cache (SmolLM2, a prefill of 16 x 128 tokens on 2 AVX-512 cores: 11.8 s in parts of
# 512 tokens, 19.4 s in one of 2048, 14.9 s in parts of 128)
BATCH_TOKENS = {"cpu": 512, "cuda": 16384}


def attention_blocks(heads: int, rows: int, row_bytes: int, device: torch.device):
    """((head0, head1), (row0, row1)) blocks covering heads x rows, each with at most the device's
    ATTN_BLOCK_BYTES of int64 scores (``row_bytes`` per row and KV head), at least one row of one head."""
    budget = ATTN_BLOCK_BYTES.get(device.type, ATTN_BLOCK_BYTES["cuda"])
    if heads * rows * row_bytes <= budget:
        return [((0, heads), (0, rows))]
    if rows * row_bytes <= budget:
        step = budget // (rows * row_bytes)
        return [((a, min(a + step, heads)), (0, rows)) for a in range(0, heads, step)]
    step = max(1, budget // row_bytes)
    return [((a, a + 1), (r, min(r + step, rows))) for a in range(heads) for r in range(0, rows, step)]


def float32_copy(owner: DerivedHolder, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """``owner``'s int8 tensor ``name`` as float32 for the CPU's exact float32 GEMM of ``x`` with it
    (``ri.int8_matmul``), kept within the derived-weights budget; None where that GEMM does not run."""
    t = getattr(owner, name)
    if t.is_cuda or not ri.float32_gemm(x):
        return None
    return owner.derived((name, "float32"), lambda: t.float())


def to_dyadic(scale: torch.Tensor) -> Dyadic:
    """float scale(s) > 0 -> m / 2^k with a 16-bit m (a conversion done at load time)."""
    s = scale.double().clamp_min(1e-300)
    k = (ri.MANT - 1 - torch.floor(torch.log2(s))).long()
    m = torch.round(s * torch.pow(2.0, k.double())).long()
    return ri.normalize(m, k)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, Dyadic]:
    """Symmetric int8 per row of a float matrix (embedding, lm_head): (q int8, dyadic per row)."""
    amax = w.float().abs().amax(dim=1).clamp_min(1e-12)
    scale = amax / 127
    q = torch.clamp(torch.round(w.float() / scale[:, None]), -127, 127).to(torch.int8)
    return q, to_dyadic(scale)


def _per_row(d: Dyadic, lead) -> tuple[torch.Tensor, torch.Tensor]:
    """A dyadic broadcast to the rows ``lead`` ((rows, 1), or a tensor's leading dims and 1) as the
    kernels take it: m and k flat, one per row."""
    return torch.broadcast_to(d.m, lead).reshape(-1), torch.broadcast_to(d.k, lead).reshape(-1)


def int_vector(g: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A float vector as int64 mantissas with one exponent: g ~= v / 2^k, max |v| in [2^14, 2^15)."""
    amax = float(g.float().abs().max())
    k = 14 - math.floor(math.log2(amax)) if amax > 0 else 0
    return torch.round(g.double() * 2.0**k).long(), k


class ILLMLinear(QuantizedModule):
    """An I-LLM linear: integer weights per output channel with dyadic scales (wm / 2^wk).

    ``int_forward(xq, scale)`` is DI-MatMul (integers in and out); ``forward(x)`` is a float
    view of the same layer for per-layer diagnostics (``qconvert verify``): x divided by the
    input smoothing folded into it (``smooth``), quantized per token, the integer product,
    dequantized and multiplied back by the output smoothing folded into its rows
    (``out_smooth``: v_proj, up_proj), so that it compares with the source's layer.
    """

    def __init__(self, layout: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 act_clip: float = 1.0):
        super().__init__()
        if bias is not None:
            raise QConvertError("I-LLM: linears with a bias are not supported by the integer runtime")
        self.layout = layout
        self.wbits = 4 if layout.startswith("illm-w4") else 8
        self.abits = 4 if layout.endswith("a4") else 8
        if not ri.valid_clip(act_clip):
            raise QConvertError(f"{layout}: act_clip={act_clip!r} must be a number in [0.5, 1]; re-run qconvert quantize")
        self.clip = ri.clip_int(act_clip)  # the input range's clip as c * 2^16 (ri.quantize_rows)
        self.out_features, self.in_features = (int(v) for v in tensors["shape"])
        q = tensors["qweight"]
        q8 = unpack_int4(q) if self.wbits == 4 else q
        if q8.shape[0] != self.out_features or q8.shape[1] < self.in_features:
            raise QConvertError(f"{layout} tensors have inconsistent shapes (qweight {tuple(q.shape)})")
        self.register_buffer("qweight", q)
        # the torch path's int8 weights [K, N] (``weights_kn``; released on the kernels, which read qweight)
        self.register_buffer("q8t", q8[:, : self.in_features].t().contiguous(), persistent=False)
        for name in ("wm", "wk", "smooth", "out_smooth"):
            self.register_buffer(name, tensors[name])
        # the channels' smallest exponent, a layer constant (DI-MatMul aligns the others to it)
        self.register_buffer("wk_min", self.wk.long().amin().reshape(1) if self.out_features else
                             torch.zeros(1, dtype=torch.int64), persistent=False)
        self.register_buffer("wk_min32", self.wk_min.to(torch.int32), persistent=False)  # as the kernel reads it
        self.register_buffer("wm64", self.wm.long(), persistent=False)  # the torch path's int64 operands
        self.register_buffer("wk_shift", self.wk.long() - self.wk_min, persistent=False)
        self.kernel = False  # DI-MatMul by the CUDA kernel (IntegerLlama.use_kernels), else torch integer ops

    def weights_kn(self) -> torch.Tensor:
        """The int8 weights as [K, N], what the torch integer product multiplies: kept, or made again
        from ``qweight`` after ``IntegerLlama.use_kernels`` released them (the DI-MatMul kernel reads
        qweight itself, so a GPU holds the weights once, not twice)."""
        if self.q8t is None:
            q8 = unpack_int4(self.qweight) if self.wbits == 4 else self.qweight
            self.q8t = q8[:, : self.in_features].t().contiguous()
        return self.q8t

    def release_kn(self) -> None:
        """Drop the torch path's [K, N] copy (and the CPU's float32 copy of it): the DI-MatMul kernel
        reads ``qweight``; ``weights_kn`` makes it again if the torch path runs."""
        self.q8t = None
        CACHE.release(self)

    def inside_stored_model(self) -> None:
        """Make ``forward`` take the smoothed input (what the folded model computes) instead of the
        source's: the float model of an I-LLM OUT (``qconvert.load(OUT, integer=False)``)."""
        self.smooth = torch.ones_like(self.smooth)
        self.out_smooth = torch.ones_like(self.out_smooth)

    @property
    def act_qmax(self) -> int:
        return (1 << (self.abits - 1)) - 1

    def kernel_fits(self) -> bool:
        """Whether the DI-MatMul kernel takes this layer: K a multiple of 32 (its int8 mma step)."""
        return self.in_features % 32 == 0

    def int_forward(self, xq: torch.Tensor, scale: Dyadic) -> tuple[torch.Tensor, Dyadic]:
        """DI-MatMul: xq int [M, K] with per-row scale -> (t int64 [M, N], per-row scale): the
        int32 accumulator times each channel's mantissa, channel exponents aligned by shifts.
        With ``kernel`` the CUDA kernel (qconvert_kernels/illm/cuda.py) computes the same t and the
        rows' exponents (the scale's k + kmin)."""
        kmin = self.wk_min
        if self.kernel:
            lead = (xq.shape[0], 1)
            t, tk = cuda_illm.illm_matmul(xq.to(torch.int8), self.qweight, self.wm, self.wk, self.wbits, self.wk_min32,
                                          _per_row(scale, lead)[1])
            return t, Dyadic(scale.m, tk.reshape(lead))
        t = ri.shift(ri.int8_matmul(xq, self.weights_kn(), float32_copy(self, "q8t", xq)) * self.wm64, self.wk_shift)
        return t, Dyadic(scale.m, scale.k + kmin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float() / self.smooth.float()
        amax = x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) * (self.clip / ri.CLIP_ONE)
        xq = torch.round(x2 * (self.act_qmax / amax)).long().clamp(-self.act_qmax, self.act_qmax)
        acc = ri.int8_matmul(xq, self.weights_kn(), float32_copy(self, "q8t", xq)).double()
        w = self.wm.double() * torch.pow(2.0, -self.wk.double())
        y = acc * (amax.double() / self.act_qmax) * (w * self.out_smooth.double())[None, :]
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class JoinedLinears:
    """Sibling I-LLM linears that read the same input (q/k/v, gate/up) as one DI-MatMul launch on the
    kernels: their weights, mantissas and exponents joined along N, each member's kmin (its own
    exponent alignment, so every member's t and row exponents are its own, bit for bit) one entry of
    ``kmin``.  The members' ``qweight`` become views of the joined one (no second copy of the
    weights; a ``state_dict`` of the model then has tensors sharing storage, which the runtime never
    saves).  Made by ``IntegerLlama.use_kernels`` on the model's device (and again after a move,
    ``IntegerLlama._apply``); ``join`` gives None where the members cannot share a launch (a K the
    kernel does not take, or different weight widths)."""

    def __init__(self, members: list[ILLMLinear]):
        self.members = list(members)
        self.wbits = members[0].wbits
        self.splits = tuple(m.out_features for m in members)
        self.qweight = torch.cat([m.qweight for m in members])
        start = 0
        for m in members:  # the members' own tensors as views: the weights are held once
            m.qweight = self.qweight[start:start + m.out_features]
            start += m.out_features
        self.wm = torch.cat([m.wm for m in members]).to(torch.int32)
        self.wk = torch.cat([m.wk for m in members]).to(torch.int32)
        self.kmin = torch.cat([m.wk_min for m in members]).to(torch.int32)

    def holds(self, members: list[ILLMLinear]) -> bool:
        """Whether these members still read their weights from this join (the same modules, each
        ``qweight`` a view of its storage): then joining them again would only copy the weights and
        free the storage that captured decode graphs point at."""
        storage = self.qweight.untyped_storage().data_ptr()
        return (len(members) == len(self.members) and all(a is b for a, b in zip(members, self.members))
                and all(m.qweight.device == self.qweight.device and m.qweight.untyped_storage().data_ptr() == storage
                        for m in members))

    @classmethod
    def join(cls, members: list[ILLMLinear]) -> "JoinedLinears | None":
        first = members[0]
        if not all(m.kernel and (m.wbits, m.in_features, tuple(m.qweight.shape[1:])) ==
                   (first.wbits, first.in_features, tuple(first.qweight.shape[1:])) for m in members):
            return None
        return cls(members)

    def int_forward(self, xq: torch.Tensor, scale: Dyadic) -> list[tuple[torch.Tensor, Dyadic]]:
        """Every member's ``ILLMLinear.int_forward`` of the same input in one launch: [(t, scale)] in
        member order, each t a column slice of the joined output (rows read in place by the kernels
        after it: illm_rope_requant, illm_swiglu)."""
        lead = (xq.shape[0], 1)
        t, tk = cuda_illm.illm_matmul(xq.to(torch.int8), self.qweight, self.wm, self.wk, self.wbits, self.kmin,
                                      _per_row(scale, lead)[1], splits=self.splits)
        outs, start = [], 0
        for i, n in enumerate(self.splits):
            outs.append((t[:, start:start + n], Dyadic(scale.m, tk[i].reshape(lead))))
            start += n
        return outs


INTEGER_RUNTIME_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_integer_runtime_config(config) -> dict:
    """Refuse a model the integer runtime cannot run (``quantize`` asks before any work, through
    the I-LLM method's ``check_config``; ``IntegerLlama`` again when it loads); returns its rope
    parameters."""
    model_type = getattr(config, "model_type", None)
    if model_type not in INTEGER_RUNTIME_MODEL_TYPES:
        raise QConvertError(f"I-LLM's integer runtime runs Llama-style models ({', '.join(INTEGER_RUNTIME_MODEL_TYPES)}); "
                            f"{model_type} is not one: choose another scheme (is-w4a8, w8a8, quik-w4a4, zqfp-w4a8)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise QConvertError(f"I-LLM's integer runtime has plain rotary embeddings only; this model uses rope_type "
                            f"{rope.get('rope_type', rope.get('type'))!r}: choose another scheme (is-w4a8, w8a8)")
    return rope


class IntegerLlama(DerivedHolder):
    """A Llama-architecture causal LM on the integer-only path (see the module docstring)."""

    def __init__(self, config, linears: dict[str, ILLMLinear], state: dict[str, torch.Tensor]):
        super().__init__()
        rope = check_integer_runtime_config(config)
        self.config = config
        from transformers import GenerationConfig

        self.generation_config = GenerationConfig.from_model_config(config)  # its EOS ids, for qconvert generate
        self.layers_n = config.num_hidden_layers
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for i in range(self.layers_n):
            blk = nn.Module()
            blk.self_attn, blk.mlp = nn.Module(), nn.Module()
            for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
                for n in names:
                    full = f"model.layers.{i}.{part}.{n}"
                    if full not in linears:
                        raise QConvertError(f"I-LLM: {full} is not quantized; the integer runtime needs every decoder linear")
                    setattr(getattr(blk, part), n, linears[full])
            for norm in ("input_layernorm", "post_attention_layernorm"):
                g, k = int_vector(state[f"model.layers.{i}.{norm}.weight"])
                blk.register_buffer(f"{norm}_g", g)
                setattr(blk, f"{norm}_k", k)
            self.model.layers.append(blk)
        g, k = int_vector(state["model.norm.weight"])
        self.register_buffer("norm_g", g)
        self.norm_k = k
        emb = state["model.embed_tokens.weight"]
        eq, d = int8_rows(emb)
        self.register_buffer("emb_q", eq)
        self.register_buffer("emb_m", d.m)
        self.register_buffer("emb_k", d.k)
        tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in state
        hq, hd = (eq, d) if tied else int8_rows(state["lm_head.weight"])  # a tied head is the same int8 table
        self.register_buffer("head_qt", hq.t().contiguous())
        self.register_buffer("head_m", hd.m)
        self.register_buffer("head_k", hd.k)
        inv_sqrt = to_dyadic(torch.tensor(1.0 / math.sqrt(self.head_dim)))
        self.inv_sqrt_d = inv_sqrt
        self.inv_sqrt_d_int = (int(inv_sqrt.m), int(inv_sqrt.k))  # as the attention kernel takes it
        # the online transform's 1 / sqrt(n) (--rotate hadamard+online: n is the MLP's width)
        inv_i = to_dyadic(torch.tensor(1.0 / math.sqrt(config.intermediate_size)))
        self.register_buffer("inv_sqrt_i_m", inv_i.m, persistent=False)  # on the model's device: a kernel's fold
        self.register_buffer("inv_sqrt_i_k", inv_i.k, persistent=False)
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))
        self.max_positions = min(int(getattr(config, "max_position_embeddings", 4096) or 4096), 32768)
        cos, sin = ri.rope_table(self.max_positions, self.head_dim, theta)  # a constant, built here once
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)
        self.kernels = False
        self._joined: dict[tuple[int, str], JoinedLinears] = {}  # (block, "qkv" or "gate_up"), on the kernels

    @property
    def inv_sqrt_i(self) -> Dyadic:
        """The online transform's 1 / sqrt(n) as a dyadic (0-dim, on the model's device)."""
        return Dyadic(self.inv_sqrt_i_m, self.inv_sqrt_i_k)

    @property
    def device(self) -> torch.device:
        return self.emb_q.device

    def use_kernels(self, on: bool = True) -> "IntegerLlama":
        """Run DI-Norm, the int8 requantizations (q, k and v with their RoPE; the heads' outputs aligned
        for o_proj), DI-MatMul (every linear whose K is a multiple of 32), the SwiGLU, the residual
        adds (each with the DI-Norm after it), attention (head_dim a multiple of 4, at most 256; in blocks
        that keep its scratch within ATTN_BLOCK_BYTES) and the online Hadamard transform by the CUDA kernels of
        qconvert_kernels/illm/cuda.py, which equal the torch integer ops bit for bit; the rest (cache
        writes outside a captured step, masks, the head) stays torch integer ops.
        ``load(OUT, device="cuda")`` turns them on; on CPU tensors the kernels run only under the
        emulator (qconvert_kernels/illm/emulate.py)."""
        self.kernels = bool(on)
        for lin in self.decoder_linears():
            lin.kernel = self.kernels and lin.kernel_fits()
            if lin.kernel:
                lin.release_kn()
        for i, blk in enumerate(self.model.layers if self.kernels else ()):
            # q/k/v and gate/up as one DI-MatMul each (JoinedLinears), kept while intact
            attn, mlp = blk.self_attn, blk.mlp
            for key, members in (("qkv", [attn.q_proj, attn.k_proj, attn.v_proj]), ("gate_up", [mlp.gate_proj, mlp.up_proj])):
                old = self._joined.pop((i, key), None)
                joined = old if old is not None and old.holds(members) else JoinedLinears.join(members)
                if joined is not None:
                    self._joined[i, key] = joined
        return self

    def decoder_linears(self) -> list[ILLMLinear]:
        """Every block's seven linears, block by block (attention's, then the MLP's)."""
        return [lin for blk in self.model.layers for part in (blk.self_attn, blk.mlp) for lin in part.children()]

    def _apply(self, fn, *args, **kwargs):
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``.cpu``), then the joined linears made again where
        the model's tensors went: a move copies each member's view on its own, and the joins, not
        module buffers, would stay behind (holding the old device's memory).  A join whose members
        still view it (a move to where the model already is) is kept."""
        out = super()._apply(fn, *args, **kwargs)
        joined = getattr(self, "_joined", None)  # (none yet while __init__ runs)
        if joined:
            for key in [key for key, j in joined.items() if not j.holds(j.members)]:
                del joined[key]
            if self.kernels:
                self.use_kernels(True)
        return out

    def _siblings(self, i: int, key: str, members, xq: torch.Tensor, xs: Dyadic) -> list[tuple[torch.Tensor, Dyadic]]:
        """``int_forward`` of block i's sibling linears ``members`` on one input: one joined launch on
        the kernels where ``use_kernels`` joined them, else one each."""
        joined = self._joined.get((i, key)) if self.kernels else None
        if joined is not None and joined.members[0] is members[0]:  # (block i's own, whatever the caller's i)
            return joined.int_forward(xq, xs)
        return [m.int_forward(xq, xs) for m in members]

    def _norm(self, h: torch.Tensor, g: torch.Tensor, gk: int, qmax: int, clip: int = ri.CLIP_ONE):
        """DI-Norm of the rows of h -> (int8-range q, per-row dyadic)."""
        if not self.kernels:
            return ri.di_rmsnorm(h, g, gk, qmax, clip)
        q, m, k = cuda_illm.rmsnorm(h, g, gk, qmax, clip)
        return q, Dyadic(m[:, None], k[:, None])

    def _requant(self, v: torch.Tensor, qmax: int, clip: int, folds: tuple, root: bool = False):
        """``ri.quantize_rows`` over the last dim for qmax <= 127, its scale then times the MLP's two
        ``folds`` (``_swiglu``'s) and, with ``root``, the online transform's 1 / sqrt(n), in turn (by
        the kernel when on, the root a device constant it reads)."""
        if not self.kernels:
            q, r = ri.quantize_rows(v, qmax, clip)
            for f in (*folds, *((self.inv_sqrt_i,) if root else ())):
                r = r * f
            return q, r
        lead = (*v.shape[:-1], 1)
        q, m, k = cuda_illm.requant_rows(v.reshape(-1, v.shape[-1]), qmax, clip, *folds,
                                         *((self.inv_sqrt_i_m, self.inv_sqrt_i_k) if root else ()))
        return q.reshape(v.shape), Dyadic(m.reshape(lead), k.reshape(lead))

    def _table(self, start: int, stop: int):
        if stop > self.max_positions:
            raise QConvertError(f"I-LLM: {stop} tokens exceed the model's {self.max_positions} positions")
        return self.rope_cos[start:stop], self.rope_sin[start:stop]

    # ---------------------------------------------------------------- integer path
    def _add_norm(self, x, sx: Dyadic, b, sb: Dyadic, norm: tuple):
        """``ri.residual_add`` of the residual and a branch, then DI-Norm of the sum with ``norm`` (g, gk,
        qmax, clip: ``_norm``'s), by one kernel when on: (h, its scale, the norm's q, its scale)."""
        if not self.kernels:
            h, hs = ri.residual_add(x, sx, b, sb)
            return (h, hs, *ri.di_rmsnorm(h, *norm))
        lead = (x.shape[0], 1)
        h, hm, hk, q, m, k = cuda_illm.residual_norm(x, *_per_row(sx, lead), b, *_per_row(sb, lead), *norm)
        return h, Dyadic(hm[:, None], hk[:, None]), q, Dyadic(m[:, None], k[:, None])

    @staticmethod
    def _norms(blk) -> tuple[tuple, tuple]:
        """A block's two DI-Norms as ``_norm`` takes them (g, gk, qmax, clip): before attention, before
        the MLP (each with its first linear's activation range)."""
        attn, mlp = blk.self_attn.q_proj, blk.mlp.gate_proj
        return ((blk.input_layernorm_g, blk.input_layernorm_k, attn.act_qmax, attn.clip),
                (blk.post_attention_layernorm_g, blk.post_attention_layernorm_k, mlp.act_qmax, mlp.clip))

    def _rope_requant(self, t: torch.Tensor, ctx: SimpleNamespace | None, per_head: bool, fold: Dyadic | None = None,
                      out_fold: Dyadic | None = None, into: tuple | None = None):
        """``ri.rope_requant`` of t [rows * tokens, L] with int8 range, RoPE at the positions of ``ctx``
        (``_positions``; None: no rotation), by the kernel when on; ``into`` (kernels only: a static
        cache's buffers of one block's keys or values and the column) writes them there instead."""
        assert into is None or self.kernels, "only the kernel writes into a cache"
        if not self.kernels:
            return ri.rope_requant(t, self.head_dim, 127, per_head, *((ctx.cos, ctx.sin) if ctx else (None, None)),
                                   fold, out_fold)
        lead = (t.shape[0], 1)
        tables = (ctx.pos, self.rope_cos, self.rope_sin) if ctx else (None, None, None)
        q, m, k = cuda_illm.rope_requant(t, self.head_dim, 127, per_head, *tables,
                                         *(_per_row(fold, lead) if fold is not None else (None, None)),
                                         *(_per_row(out_fold, lead) if out_fold is not None else (None, None)), into=into)
        return q, Dyadic(m[..., None], k[..., None])

    def _positions(self, rows: int, t: int, cache: SequenceCache | None, device) -> SimpleNamespace:
        """What every block's attention of ``rows`` sequences of t new tokens shares (made once per
        forward): each token's position ``pos`` [rows * t] (row-major) and, on the torch path, its
        rotary tables (``cos``, ``sin`` [rows * t, d / 2]), the causal mask [t, n] (token j sees keys
        0 .. start + j) and, with the cache's left padding, ``real`` [rows * KV, n] (the row's real
        columns, per KV head as attention folds them; else None).  A padded row's positions count
        from its first real token."""
        if getattr(cache, "column", None) is not None:
            return self._wide_positions(rows, t, cache, device)
        pad = cache.pad if cache is not None else None
        start = cache.length if cache is not None else 0
        n = start + t
        self._table(start, n)  # (the bound check: positions below n)
        pos = torch.arange(start, n, device=device)
        real = None
        if pad is not None:
            pos = (pos[None, :] - pad[:, None]).clamp_min(0)  # [rows, t]
            real = (torch.arange(n, device=device)[None, :] >= pad[:, None]).repeat_interleave(self.kv_heads, 0)
        causal = torch.ones(t, n, dtype=torch.bool, device=device).tril(diagonal=start)
        return self._tables(pos.expand(rows, t).reshape(-1), n=n, causal=causal, real=real)

    def _tables(self, pos: torch.Tensor, **ctx) -> SimpleNamespace:
        """A forward's positions ``pos`` [tokens] and what goes with them: the rotary tables' rows when
        the torch path rotates (the kernel reads them by position), and ``mask``, the attention
        kernel's, made by the first block that needs it."""
        if self.kernels:
            return SimpleNamespace(pos=pos, cos=None, sin=None, mask=None, **ctx)
        return SimpleNamespace(pos=pos, cos=self.rope_cos[pos], sin=self.rope_sin[pos], mask=None, **ctx)

    def _wide_positions(self, rows: int, t: int, cache: StaticSequenceCache, device) -> SimpleNamespace:
        """``_positions`` of a captured decode step (``cache.column``, a device tensor, is where the
        new token goes): attention reads all of the cache's columns, the unfilled ones masked out,
        and nothing is read back to the host, so the same step replays at any length."""
        if t != 1:
            raise QConvertError(f"a cache on a device column runs one token per row, not {t}")
        n, at = cache.max_len, cache.column
        self._table(0, n)  # every position the step may take has its table row (the kernel reads it unchecked)
        pad = cache.pad if cache.pad is not None else torch.zeros(rows, dtype=torch.int64, device=device)
        cols = torch.arange(n, device=device)
        causal = (cols <= at)[None, :]  # [1, n]: the filled columns and the new one
        real = (cols[None, :] >= pad[:, None]).repeat_interleave(self.kv_heads, 0)
        return self._tables((at - pad).clamp_min(0), n=n, causal=causal, real=real)

    def _attn_block(self, blk, xq: torch.Tensor, xs: Dyadic, rows: int, ctx: SimpleNamespace,
                    cache: SequenceCache | None = None, i: int = 0):
        """Attention of ``rows`` sequences of t tokens each (``xq`` [rows * t, hidden], row-major: the
        block's input norm, scale ``xs``) at the positions ``ctx`` (``_positions``); with ``cache``,
        after its ``length`` tokens (block ``i``'s int8 keys and values appended to it)."""
        attn = blk.self_attn
        d, bt, kvh = self.head_dim, rows, self.kv_heads
        t = xq.shape[0] // bt
        n, causal, real = ctx.n, ctx.causal, ctx.real
        (tq, sq), (tk, sk), (tv, sv) = self._siblings(i, "qkv", (attn.q_proj, attn.k_proj, attn.v_proj), xq, xs)
        # 16 bits per token, RoPE, int8: q per token over all heads (scale ratio * rq * sq), keys and
        # values per head and token (ratio * (rk * sk)): [rows * t, heads * d], scales [rows * t, G, 1].
        # Nothing depends on a later token or another row, so the model is causal and its KV cache
        # holds keys and values as they are
        q8, s_q = self._rope_requant(tq, ctx, False, out_fold=sq)
        if self.kernels and getattr(cache, "column", None) is not None:
            # a captured step's keys and values go straight into the static cache at its device
            # column (what ``cache.extend`` would copy there), and attention reads all its columns
            kb, skb, vb, svb = cache.buffers[i]
            self._rope_requant(tk, ctx, True, fold=sk, into=(kb, skb.m, skb.k, cache.column))
            self._rope_requant(tv, None, True, fold=sv, into=(vb, svb.m, svb.k, cache.column))
            kv = cache.buffers[i]
        else:
            k8, s_k = self._rope_requant(tk, ctx, True, fold=sk)
            v8, s_v = self._rope_requant(tv, None, True, fold=sv)

            def per_head(x):  # [rows * t, KV, ...] -> [rows, KV, t, ...]
                return x.reshape(bt, t, kvh, *x.shape[2:]).transpose(1, 2)

            kv = (per_head(k8.reshape(bt * t, kvh, d)).to(torch.int8), Dyadic(per_head(s_k.m), per_head(s_k.k)),
                  per_head(v8.reshape(bt * t, kvh, d)).to(torch.int8), Dyadic(per_head(s_v.m), per_head(s_v.k)))
            if cache is not None:
                kv = cache.extend(i, *kv)
        k8, s_k, v8, s_v = kv
        group = self.heads // kvh
        # the rows' KV heads as one axis of rows x KV heads (each row reads its own keys)
        k8, v8 = k8.reshape(bt * kvh, n, d), v8.reshape(bt * kvh, n, d)
        s_km, s_vm = s_k.m.reshape(bt * kvh, n), s_v.m.reshape(bt * kvh, n)
        s_kk, s_vk = s_k.k.reshape(bt * kvh, n), s_v.k.reshape(bt * kvh, n)
        # the query heads at once, grouped by the KV head they read ([rows*KV, group, t, ...]; head
        # g * group + j), in blocks of KV heads and query rows (rows are independent) that keep an
        # int64 [heads, group, rows, n] within the device's budget (attention_blocks)
        qg = q8.reshape(bt, t, kvh, group, d).permute(0, 2, 3, 1, 4).reshape(bt * kvh, group, t, d)
        blocks = attention_blocks(bt * kvh, t, group * n * 8, xq.device)
        kernel = self.kernels and self._attention_kernel_fits(bt * kvh)
        if kernel and len(blocks) == 1:
            # the kernel's int64 scratch is that [heads, group, rows, n] too: every head and query
            # row in one launch where it fits the budget (every decode step, and prefills up to that
            # size), a launch per block below, beyond it
            if ctx.mask is None:  # the attention kernel's uint8 [1 or rows*KV, t, n], made once per forward
                ctx.mask = (causal[None] if real is None else causal[None] & real[:, None, :]).to(torch.uint8)
            # the query's scale once per sequence ([rows, t]; its KV heads' head-rows read it: qdiv)
            out, exp = cuda_illm.attention(qg.to(torch.int8), s_q.m.reshape(bt, t), s_q.k.reshape(bt, t), k8, s_km, s_kk,
                                           v8, s_vm, s_vk, ctx.mask, self.inv_sqrt_d_int, qdiv=kvh)
            return self._attn_out(attn, out, exp, bt, t)
        # per block: the query's scale for each head-row
        sqm = s_q.m.reshape(bt, 1, 1, t, 1).expand(bt, kvh, 1, t, 1).reshape(bt * kvh, 1, t, 1)
        sqk = s_q.k.reshape(bt, 1, 1, t, 1).expand(bt, kvh, 1, t, 1).reshape(bt * kvh, 1, t, 1)
        out = torch.empty(bt * kvh, group, t, d, dtype=torch.int64, device=xq.device)
        exp = torch.empty(bt * kvh, group, t, 1, dtype=torch.int64, device=xq.device)
        for (a, b), (r0, r1) in blocks:
            # the causal mask, joined with the padding's, per block (the whole one can outgrow the budget)
            mk = causal[None, r0:r1] if real is None else causal[None, r0:r1] & real[a:b, None, :]  # [1 or heads, nr, n]
            if kernel:
                out[a:b, :, r0:r1], exp[a:b, :, r0:r1, 0] = cuda_illm.attention(
                    qg[a:b, :, r0:r1].to(torch.int8), sqm[a:b, :, r0:r1], sqk[a:b, :, r0:r1], k8[a:b], s_km[a:b], s_kk[a:b],
                    v8[a:b], s_vm[a:b], s_vk[a:b], mk, self.inv_sqrt_d_int)
            else:
                out[a:b, :, r0:r1], exp[a:b, :, r0:r1] = ri.attention(
                    qg[a:b, :, r0:r1], Dyadic(sqm[a:b, :, r0:r1], sqk[a:b, :, r0:r1]), k8[a:b], Dyadic(s_km[a:b], s_kk[a:b]),
                    v8[a:b], Dyadic(s_vm[a:b], s_vk[a:b]), mk, self.inv_sqrt_d)
        return self._attn_out(attn, out, exp, bt, t)

    def _attention_kernel_fits(self, head_rows: int) -> bool:
        """Whether ``illm_attention`` takes this model's attention: head_dim a multiple of 4 up to its
        maximum and the grid's limits (its scratch is kept within the budget by running in blocks)."""
        group = self.heads // self.kv_heads
        return (self.head_dim % 4 == 0 and self.head_dim <= cuda_illm.ATTN_MAX_D and head_rows <= cuda_illm.ATTN_MAX_GRID
                and group <= cuda_illm.ATTN_MAX_GRID)

    def _attn_out(self, attn, out: torch.Tensor, exp: torch.Tensor, bt: int, t: int):
        """The heads' outputs (``ri.attention``'s, [rows*KV, group, t, d], and their exponents, one per
        head and token in any shape of that order) on one exponent per token, requantized for o_proj
        (``ri.heads_requant``, by the kernel when on), and o_proj."""
        o, lin = out.reshape(bt, self.heads, t, self.head_dim), attn.o_proj
        if self.kernels:
            q, m, k = cuda_illm.heads_requant(o, exp.reshape(bt, self.heads, t), lin.act_qmax, lin.clip)
            return lin.int_forward(q, Dyadic(m[:, None], k[:, None]))
        return lin.int_forward(*ri.heads_requant(o, exp.reshape(bt, self.heads, t, 1), lin.act_qmax, lin.clip))

    def _mlp_block(self, blk, xq: torch.Tensor, xs: Dyadic, i: int):
        """The MLP of block i's post-attention norm ``xq`` (scale ``xs``)."""
        mlp = blk.mlp
        (tg, sg), (tu, su) = self._siblings(i, "gate_up", (mlp.gate_proj, mlp.up_proj), xq, xs)
        a, folds = self._swiglu(tg, sg, tu, su)  # a's scale sg * su, |a| < 2^30
        online = getattr(mlp.down_proj, "online_transform", None)  # --rotate hadamard+online (qconvert.load)
        if online is not None:  # a (A (x) H) / sqrt(n): integers below 2^30 n, the root in the scale
            a = self._hadamard(a, online)
        # a's scale ra * sg * su (* 1 / sqrt(n)): dyadic products round, this order is the format's (tests/test_golden.py)
        aq, scale = self._requant(a, mlp.down_proj.act_qmax, mlp.down_proj.clip, folds, root=online is not None)
        return mlp.down_proj.int_forward(aq, scale)

    def _swiglu(self, tg, sg: Dyadic, tu, su: Dyadic):
        """``ri.swiglu`` (by the kernel when on): a and its scale's two factors as ``_requant`` takes
        them, the gate's and the up's Dyadics, or on the kernels their m and k [2, rows] as the kernel
        wrote them (no stacking)."""
        if not self.kernels:
            a, sg, su = ri.swiglu(tg, sg, tu, su)
            return a, (sg, su)
        lead = (tg.shape[0], 1)
        a, fm, fk = cuda_illm.swiglu(tg, *_per_row(sg, lead), tu, *_per_row(su, lead), folds=True)
        return a, (fm, fk)

    def _hadamard(self, a: torch.Tensor, online):
        """``ri.hadamard_rows`` of the rows of a with the down_proj input's transform (by the kernel when on)."""
        if not self.kernels:
            return ri.hadamard_rows(a, online.sign_on(a.device, torch.int64), online.lp)
        return cuda_illm.hadamard(a, online.sign_on(a.device, torch.int8), online.lp)

    def forward_int(self, input_ids: torch.Tensor, cache: SequenceCache | None = None,
                    last_only: bool = False) -> tuple[torch.Tensor, Dyadic]:
        """Integer logits of one sequence's T tokens (``input_ids`` [T]: [T, V]) or of b sequences of
        t tokens each, as one batch ([b, t]: [b * t, V], row-major), and their per-row dyadic scale;
        with ``cache``, the tokens continue the cached ones (which it then holds too); ``last_only``:
        the head runs on each sequence's last token only ([b, V]: what a decode engine reads).
        Every operation is per token, per row or within one row's attention, so each row's integers
        are those it gets alone."""
        ids = input_ids.to(self.device)
        rows = ids.shape[0] if ids.dim() == 2 else 1
        ids = ids.reshape(-1)
        h = self.emb_q[ids].long()
        hs = Dyadic(self.emb_m[ids][:, None], self.emb_k[ids][:, None])
        ctx = self._positions(rows, ids.numel() // rows, cache, h.device)
        # each residual add and the DI-Norm after it as one step: the next block's input norm, or
        # the final norm (int8, no clip) after the last block
        blocks = list(self.model.layers)
        final = (self.norm_g, self.norm_k, 127, ri.CLIP_ONE)
        xq, xs = self._norm(h, *(self._norms(blocks[0])[0] if blocks else final))
        for i, blk in enumerate(blocks):
            o, os_ = self._attn_block(blk, xq, xs, rows, ctx, cache, i)
            h, hs, xq, xs = self._add_norm(h, hs, o, os_, self._norms(blk)[1])
            m, ms = self._mlp_block(blk, xq, xs, i)
            nxt = self._norms(blocks[i + 1])[0] if i + 1 < len(blocks) else final
            h, hs, xq, xs = self._add_norm(h, hs, m, ms, nxt)
        if last_only:  # (the norm is per token: the last tokens' rows of all of them)
            xq = xq.reshape(rows, -1, xq.shape[-1])[:, -1]
            xs = Dyadic(xs.m.reshape(rows, -1)[:, -1:], xs.k.reshape(rows, -1)[:, -1:])
        acc = ri.int8_matmul(xq, self.head_qt, float32_copy(self, "head_qt", xq))  # [T, V]
        if cache is not None:
            cache.length += ids.numel() // rows
        return acc, Dyadic(xs.m, xs.k)

    def logits(self, input_ids: torch.Tensor, cache: SequenceCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Float logits [b, t, V] of b sequences of t tokens (``forward_int`` as one batch, then the
        one float step: integers -> logits, x scale_row x scale_vocab_row); ``last_only``: [b, 1, V].
        The rows run in parts of at most the device's BATCH_TOKENS tokens (at least one row)."""
        ids = input_ids.reshape(-1, input_ids.shape[-1])
        rows, t = ids.shape
        step = max(1, BATCH_TOKENS.get(self.device.type, BATCH_TOKENS["cuda"]) // max(t, 1))
        if rows > step:
            spans = [(r, min(r + step, rows)) for r in range(0, rows, step)]
            parts = [None if cache is None else cache.take(a, b) for a, b in spans]
            out = torch.cat([self.logits(ids[a:b], part, last_only) for (a, b), part in zip(spans, parts)])
            if cache is not None:
                cache.join(parts)
            return out
        acc, s = self.forward_int(ids, cache, last_only)
        scale_t = s.m.double() * torch.pow(2.0, -s.k.double())
        scale_v = self.head_m.double() * torch.pow(2.0, -self.head_k.double())
        return (acc.double() * scale_t * scale_v[None, :]).float().reshape(rows, -1, acc.shape[-1])

    def sequence_logits(self, input_ids: torch.Tensor, cache: SequenceCache | None = None) -> torch.Tensor:
        """Float logits [T, V] of one sequence."""
        return self.logits(input_ids.reshape(1, -1), cache)[0]

    def decode_engine(self, max_batch: int, max_len: int, graphs: bool | None = None) -> IntegerDecodeEngine:
        """The engine ``qconvert.generate`` runs this model on (prefill, then cached decode steps;
        ``graphs`` None: CUDA graphs on a GPU)."""
        return IntegerDecodeEngine(self, max_batch, max_len, graphs)

    def tie_weights(self, *args, **kwargs) -> None:
        """transformers' hook, which lm-eval calls: a tied head is already the embedding's int8 table."""

    def generate(self, input_ids: torch.Tensor, **options) -> torch.Tensor:
        """transformers' ``generate`` on the integer decode engine: prompt and new token ids [B, P + new]
        (``qconvert.generate.generate_ids``: greedy, or ``do_sample`` with a ``temperature``)."""
        from qconvert.generate import generate_ids

        return generate_ids(self, input_ids, **options)

    def forward(self, input_ids: torch.Tensor, past_key_values: IntegerKVCache | None = None, use_cache: bool = False,
                labels: torch.Tensor | None = None, **kwargs):
        """Float logits [B, T, V], the rows as one batch.  ``use_cache``: keep the integer KV cache
        (qconvert/layouts/illm_cache.py) and return it as ``past_key_values``; passing it back runs
        only the new tokens, with the logits the whole sequence gives.  ``labels`` ([B, T], -100 left
        out): also ``loss``, transformers' mean cross-entropy of each next token."""
        seqs = input_ids.reshape(-1, input_ids.shape[-1])
        cache = past_key_values
        if cache is not None and (not isinstance(cache, IntegerKVCache) or cache.batch != seqs.shape[0]
                                  or cache.blocks_n != self.layers_n):
            raise QConvertError(f"past_key_values must be the IntegerKVCache of {seqs.shape[0]} rows that this model "
                                "returned with use_cache=True, not "
                                + (f"one of {cache.batch} rows and {cache.blocks_n} blocks"
                                   if isinstance(cache, IntegerKVCache) else type(cache).__name__))
        if cache is None and use_cache:
            cache = IntegerKVCache(seqs.shape[0], self.layers_n)
        if cache is None:
            logits = self.logits(seqs)
        else:
            logits = torch.empty(*seqs.shape, self.head_m.numel(), device=self.device)
            for rows, seq in cache.groups:  # rows of one cached length run together
                logits[rows] = self.logits(seqs[rows], seq)
        logits = logits.reshape(*input_ids.shape, -1)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(),
                                               labels[..., 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits, past_key_values=cache if use_cache else None)


def _clip_words(clip) -> str:
    return f"; each linear's input range clipped to {clip:g} of the token's max |x|" if clip != 1 else ""


class ILLMLayout(Layout):
    """illm-w8a8 / illm-w4a8 / illm-w4a4: see the module docstring."""

    def __init__(self, name: str, doc: str, w_bits: int):
        super().__init__(name, doc)
        self.w_bits = w_bits

    def params(self, config: dict, shape_of) -> dict:
        clip = config.get("act_clip", 1.0)
        if not ri.valid_clip(clip):
            raise QConvertError(f"config.json: quantization_config.config act_clip={clip!r} of layout {self.name} "
                                "must be a number in [0.5, 1]; re-run qconvert quantize")
        return {"act_clip": float(clip)}

    def export_scheme(self, n, k, act_clip=1.0) -> dict:
        raise NotExportable(f"layout {self.name} has no compressed-tensors equivalent: it runs on I-LLM's integer-only "
                            "runtime (dyadic scales, smoothing folded into the weights and norms, integer softmax and "
                            "norms), which transformers and vLLM do not have; the nearest exportable schemes are w8a8 "
                            "(int8) and is-w4a8 (int4 weights, int8 activations)")

    def spec(self, n: int, k: int, act_clip: float = 1.0) -> dict[str, TensorSpec]:
        four = self.w_bits == 4
        return {"qweight": TensorSpec(torch.uint8 if four else torch.int8, (n, (k + 1) // 2) if four else (n, k),
                                      "integer weights" + (", two int4 per byte" if four else "")),
                "shape": TensorSpec(torch.int64, (2,), "the true [N, K]"),
                "wm": TensorSpec(torch.int32, (n,), "dyadic scale mantissas (< 2^16)"),
                "wk": TensorSpec(torch.int32, (n,), "dyadic scale exponents"),
                "smooth": TensorSpec(torch.float32, (k,), "input smoothing folded into the layer"),
                "out_smooth": TensorSpec(torch.float32, (n,), "output smoothing folded into its rows")}

    def check(self, name, tensors, n, k, act_clip: float = 1.0) -> list[str]:
        problems = shape_check(name, tensors, n, k)
        wm = tensors["wm"]
        if ((wm < 0) | (wm >= 1 << 16)).any():
            problems.append(f"{name}.wm holds mantissas outside [0, 2^16)")
        return problems + finite_positive(name, tensors["smooth"], "smooth")

    def module(self, tensors, bias, act_clip: float = 1.0) -> ILLMLinear:
        return ILLMLinear(self.name, tensors, bias, act_clip)

    def random_tensors(self, n, k, gen, device, act_clip: float = 1.0) -> dict[str, torch.Tensor]:
        """Random integer weights (uniform levels) with dyadic scales of the size of the synthetic
        models' float init (std 0.02): max |w| per channel between 0.06 and 0.12 (w8: scale m / 2^26
        over 127 levels; w4: m / 2^22 over 7 and 8), a weight std of about 0.05."""
        if self.w_bits == 4:
            q = torch.randint(0, 256, (n, (k + 1) // 2), generator=gen, device=device, dtype=torch.uint8)
        else:
            q = torch.randint(-127, 128, (n, k), generator=gen, device=device, dtype=torch.int8)
        exp = 22 if self.w_bits == 4 else 26  # 2^16 / 2^26 ~ 0.08 / 127
        return {"qweight": q, "shape": torch.tensor([n, k], dtype=torch.int64),
                "wm": torch.randint(1 << 15, 1 << 16, (n,), generator=gen, device=device, dtype=torch.int32),
                "wk": torch.full((n,), exp, dtype=torch.int32, device=device),
                "smooth": torch.ones(k, device=device), "out_smooth": torch.ones(n, device=device)}

    @staticmethod
    def model_runtime(out, config, linears: dict, state: dict, device) -> IntegerLlama:
        """The integer-only model of an I-LLM OUT: on the CPU, torch integer ops; on a GPU, with the
        I-LLM kernels turned on (``IntegerLlama.use_kernels``)."""
        model = IntegerLlama(config, linears, state).eval()
        if device.type == "cuda":
            # the torch path's int8 copies released while still on the host (never on the GPU), the
            # siblings joined on the GPU by use_kernels, after the move
            for lin in model.decoder_linears():
                if lin.kernel_fits():
                    lin.release_kn()
            model.to(device).use_kernels(True)
        return model

    def card_rows(self, config: dict) -> list[tuple[str, str]]:
        return [("weights", f"int{config.get('w_bits')}, symmetric, per output channel, dyadic scales m / 2^k"),
                ("activations", f"int{config.get('a_bits')}, dynamic, per-token, symmetric, integer-only inference "
                                "(integer norm, softmax, SiLU and RoPE)" + _clip_words(config.get("act_clip", 1.0)))]

    def tags(self, config: dict) -> list[str]:
        w, a = config.get("w_bits"), config.get("a_bits")
        return [f"int{w}", f"w{w}a{a}", f"int{a}-activations", "i-llm", "integer-only"]


ILLM_W8A8 = ILLMLayout("illm-w8a8", "I-LLM: int8 per-channel weights with dyadic scales, integer-only inference", w_bits=8)
ILLM_W4A8 = ILLMLayout("illm-w4a8", "I-LLM: int4 per-channel weights, int8 activations, integer-only inference", w_bits=4)
ILLM_W4A4 = ILLMLayout("illm-w4a4", "I-LLM: int4 weights and activations, integer-only inference", w_bits=4)
