"""The KV cache of I-LLM's integer-only model and its decode engine (``qconvert generate``).

The rows of a batch run together (``IntegerLlama.forward_int`` on [b, t] ids); a cache is a list
of groups of rows, each a ``SequenceCache`` whose tensors lead with the group's rows (one group
of every row, as ``forward`` makes it), or the decode engine's ``StaticSequenceCache`` (one group
of every row, left-padded prompts included, in buffers allocated once).  Per block it holds what
attention reads, as the model made it:

    keys    int8 [b, KV, T, head_dim] after the integer RoPE, one dyadic scale per head and token
            (m, k int64 [b, KV, T, 1])
    values  int8 [b, KV, T, head_dim], one dyadic scale per head and token

No scale spans tokens or rows (``IntegerLlama._attn_block``), so a cached step of a batch
computes, bit for bit, what each row's whole sequence run alone computes for its new tokens
(tests/test_illm.py).  Memory per token and block: 2 x kv_heads x (head_dim + 16) bytes
(SmolLM2-135M: 30 blocks x 3 heads of 64 -> 14 KiB per token; the engine's cache allocates
max_batch x max_len tokens of it at once).
"""

from __future__ import annotations

import torch

from qconvert.errors import QConvertError
from qconvert_kernels.illm.reference import Dyadic, sync_free


def _cat(a: Dyadic, b: Dyadic) -> Dyadic:
    return Dyadic(torch.cat([a.m, b.m], -2), torch.cat([a.k, b.k], -2))


class SequenceCache:
    """The cache of rows of equal length: ``length`` tokens each, per block (keys, key scales,
    values, value scales) with the rows first and the tokens on dim -2.  ``pad`` (int64 [rows] on
    the model's device, or None): the left padding of each row, its first columns, which attention
    leaves out and positions do not count."""

    def __init__(self, blocks: int, pad: torch.Tensor | None = None):
        self.length = 0
        self.blocks: list[tuple | None] = [None] * blocks
        self.pad = pad

    def extend(self, i: int, k: torch.Tensor, sk: Dyadic, v: torch.Tensor, sv: Dyadic):
        """Append block ``i``'s new keys / values and their scales (tokens on dim -2); return all of them."""
        old = self.blocks[i]
        if old is not None:
            if old[0].shape[:-2] != k.shape[:-2]:
                raise QConvertError(f"a cache of rows x heads {tuple(old[0].shape[:-2])} cannot take the keys of "
                                    f"{tuple(k.shape[:-2])}: pass the cache these rows made")
            k, sk, v, sv = torch.cat([old[0], k], -2), _cat(old[1], sk), torch.cat([old[2], v], -2), _cat(old[3], sv)
        self.blocks[i] = (k, sk, v, sv)
        return k, sk, v, sv

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.blocks if b is not None
                   for t in (b[0], b[1].m, b[1].k, b[2], b[3].m, b[3].k))

    def take(self, r0: int, r1: int) -> "SequenceCache":
        """Rows r0 .. r1 - 1 of this cache (views), to run a part of the batch."""
        part = SequenceCache(len(self.blocks), None if self.pad is None else self.pad[r0:r1])
        part.length = self.length
        part.blocks = [None if b is None else (b[0][r0:r1], Dyadic(b[1].m[r0:r1], b[1].k[r0:r1]), b[2][r0:r1],
                                              Dyadic(b[3].m[r0:r1], b[3].k[r0:r1])) for b in self.blocks]
        return part

    def join(self, parts: list["SequenceCache"]) -> None:
        """Become the rows of ``parts`` (``take``'s, run on), in order."""
        def cat(xs):
            return torch.cat(list(xs), 0)

        self.length = parts[0].length
        self.pad = None if self.pad is None else torch.cat([p.pad for p in parts])
        self.blocks = [None if parts[0].blocks[i] is None else
                       (cat(p.blocks[i][0] for p in parts), Dyadic(cat(p.blocks[i][1].m for p in parts), cat(p.blocks[i][1].k for p in parts)),
                        cat(p.blocks[i][2] for p in parts), Dyadic(cat(p.blocks[i][3].m for p in parts), cat(p.blocks[i][3].k for p in parts)))
                       for i in range(len(self.blocks))]


class StaticSequenceCache:
    """A ``SequenceCache`` in buffers allocated once (the decode engine's): per block keys and values
    int8 [rows, KV, max_len, head_dim] and their scales' m, k int64 [rows, KV, max_len, 1], the
    tokens written in place instead of concatenated.  It reads as the growing cache does: ``extend``
    returns the first ``length + t`` columns, the same integers.  With ``column`` (an int64 [1]
    device tensor, the engine's, set before each step) a step of one token per row writes at that
    column and returns all ``max_len`` columns, for attention over a fixed shape with the unfilled
    columns masked out (``IntegerLlama._wide_positions``): what a CUDA graph captures.  (On the I-LLM
    kernels such a step writes its keys and values into ``buffers`` itself, without ``extend``.)"""

    def __init__(self, blocks: int, rows: int, kv_heads: int, max_len: int, head_dim: int, device,
                 pad: torch.Tensor | None = None):
        self.length, self.max_len, self.pad = 0, max_len, pad
        self.column: torch.Tensor | None = None

        def zeros(width, dtype):
            return torch.zeros(rows, kv_heads, max_len, width, dtype=dtype, device=device)

        self.buffers = [(zeros(head_dim, torch.int8), Dyadic(zeros(1, torch.int64), zeros(1, torch.int64)),
                         zeros(head_dim, torch.int8), Dyadic(zeros(1, torch.int64), zeros(1, torch.int64)))
                        for _ in range(blocks)]

    @staticmethod
    def _parts(entry) -> tuple[torch.Tensor, ...]:
        k, sk, v, sv = entry
        return k, sk.m, sk.k, v, sv.m, sv.k

    @staticmethod
    def _entry(parts) -> tuple:
        k, skm, skk, v, svm, svk = parts
        return k, Dyadic(skm, skk), v, Dyadic(svm, svk)

    def extend(self, i: int, k: torch.Tensor, sk: Dyadic, v: torch.Tensor, sv: Dyadic):
        """Write block ``i``'s new keys / values and their scales after the ``length`` held (at
        ``column`` when set); return the columns attention reads."""
        new = self._parts((k, sk, v, sv))
        held = self._parts(self.buffers[i])
        if new[0].shape[:2] != held[0].shape[:2]:
            raise QConvertError(f"a cache of rows x heads {tuple(held[0].shape[:2])} cannot take the keys of "
                                f"{tuple(new[0].shape[:2])}: pass the cache these rows made")
        if self.column is not None:
            for buf, x in zip(held, new):
                buf.index_copy_(2, self.column, x)
            return self.buffers[i]
        t = new[0].shape[2]
        if self.length + t > self.max_len:
            raise QConvertError(f"the cache's {self.max_len} columns cannot take {self.length} + {t} tokens; "
                                "make a longer IntegerDecodeEngine")
        for buf, x in zip(held, new):
            buf[:, :, self.length:self.length + t] = x
        return self._entry(buf[:, :, :self.length + t] for buf in held)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.buffers for t in self._parts(b))

    def take(self, r0: int, r1: int) -> "StaticSequenceCache":
        """Rows r0 .. r1 - 1 (views of the same buffers, so ``join`` has nothing to copy)."""
        part = StaticSequenceCache.__new__(StaticSequenceCache)
        part.length, part.max_len, part.column = self.length, self.max_len, self.column
        part.pad = None if self.pad is None else self.pad[r0:r1]
        part.buffers = [self._entry(t[r0:r1] for t in self._parts(b)) for b in self.buffers]
        return part

    def join(self, parts: list["StaticSequenceCache"]) -> None:
        self.length = parts[0].length


class IntegerKVCache:
    """The cache of a batch of ``rows``: groups of rows (``(row indices, SequenceCache)``) that
    run together.  ``groups=None``: one group of every row, as ``IntegerLlama.forward`` makes it
    (``pad``: each row's left padding); the decode engine's is ``holding`` its static cache."""

    def __init__(self, rows: int, blocks: int, groups: list[list[int]] | None = None, pad: torch.Tensor | None = None):
        self.batch, self.blocks_n = rows, blocks
        groups = [list(range(rows))] if groups is None else groups
        if sorted(r for g in groups for r in g) != list(range(rows)) or not all(groups):
            raise QConvertError(f"IntegerKVCache groups {groups} must split rows 0..{rows - 1} once each")
        if pad is not None and (len(groups) != 1 or tuple(pad.shape) != (rows,) or pad.dtype != torch.int64):
            raise QConvertError(f"IntegerKVCache: left padding is int64 [{rows}] (got {pad.dtype} {tuple(pad.shape)}) "
                                "and goes with one group of every row")
        self.groups = [(g, SequenceCache(blocks, pad)) for g in groups]

    @classmethod
    def holding(cls, seq, rows: int) -> "IntegerKVCache":
        """A cache of one group of ``rows`` rows held by ``seq`` (the decode engine's static cache)."""
        cache = cls(rows, len(seq.buffers), pad=seq.pad)
        cache.groups = [(list(range(rows)), seq)]
        return cache

    @property
    def lengths(self) -> list[int]:
        """Tokens held per row (its padding left out)."""
        out = [0] * self.batch
        for rows, seq in self.groups:
            pad = [0] * len(rows) if seq.pad is None else seq.pad.tolist()
            for r, p in zip(rows, pad):
                out[r] = seq.length - p
        return out

    def nbytes(self) -> int:
        return sum(seq.nbytes() for _, seq in self.groups)


class IntegerDecodeEngine:
    """Prefill and one-token decode steps of ``IntegerLlama`` over its integer KV cache, with the
    interface of ``qconvert.engine.DecodeEngine`` that ``qconvert.generate`` uses, on the model's
    device (a GPU: its kernels).  All rows run as one batch; a row's left padding
    (``attention_mask``) takes no part in its attention and its positions count from its first
    real token, so each row computes the bits of its prompt alone.

    The cache is a ``StaticSequenceCache`` of ``max_batch`` rows, allocated once.  ``graphs`` (None:
    on CUDA) captures the decode step of each batch size as a CUDA graph at its first ``decode``
    (a warm-up step, then the capture, as qconvert/engine.py does): one token per row written at
    a device column, attention over all ``max_len`` columns with the unfilled ones masked out,
    every operation branch-free (``reference.sync_free``), so it replays at any length.  Its
    logits are the eager step's bit for bit (the masked columns add nothing), and a replay is one
    launch from the host instead of the tens of thousands of small integer ops of an eager step
    (benchmarks/illm_step_ops.py counts them; not yet run on a GPU)."""

    def __init__(self, model, max_batch: int, max_len: int, graphs: bool | None = None):
        if max_batch < 1 or max_len < 2:
            raise QConvertError(f"IntegerDecodeEngine(max_batch={max_batch}, max_len={max_len}): need max_batch >= 1 "
                                "and max_len >= 2")
        if max_len > model.max_positions:
            raise QConvertError(f"max_len {max_len} is longer than the model's {model.max_positions} positions; "
                                "generate fewer tokens")
        self.model, self.config = model, model.config
        self.device = model.device
        if graphs is None:
            graphs = self.device.type == "cuda"
        if graphs and self.device.type != "cuda":
            raise QConvertError("CUDA graphs need a CUDA device; use graphs=False (or None) on CPU")
        self.graphs = bool(graphs)
        self._wide = self.graphs  # decode steps in the captured shape (tests set it on the CPU)
        self.max_batch, self.max_len = max_batch, max_len
        self._static = StaticSequenceCache(model.layers_n, max_batch, model.kv_heads, max_len, model.head_dim,
                                           self.device)
        self._ids = torch.zeros(max_batch, 1, dtype=torch.int64, device=self.device)
        self._pad = torch.zeros(max_batch, dtype=torch.int64, device=self.device)
        self._column = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._logits = torch.zeros(max_batch, model.head_m.numel(), device=self.device) if self.graphs else None
        self._graph_of: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.cache: IntegerKVCache | None = None
        self.batch = self.length = 0

    def _seq(self) -> StaticSequenceCache:
        (_, seq), = self.cache.groups
        return seq

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start new sequences from left-padded prompts (``input_ids`` [B, P], ``attention_mask`` [B, P]
        1 on tokens, 0 on the padding, or None): logits [B, V] of each row's last token."""
        from qconvert.engine import left_padding  # (transformers: imported when generating only)

        pad = left_padding(input_ids, attention_mask, self.max_batch, self.max_len, type(self).__name__)
        b, t = input_ids.shape
        self._pad[:b].copy_(pad)
        # eager steps leave out an all-zero padding (fewer ops); a captured step always masks by it,
        # so that one graph serves padded and unpadded batches
        seq = self._static.take(0, b)
        seq.length, seq.pad = 0, self._pad[:b] if self._wide or bool(pad.any()) else None
        self.cache = IntegerKVCache.holding(seq, b)
        self.batch, self.length = b, t
        return self.model.logits(input_ids.to(self.device), seq, last_only=True)[:, -1]

    @torch.inference_mode()
    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        """One token per row ([B] or [B, 1]): logits [B, V] (with graphs, a view of the engine's
        logits buffer, overwritten by the next step: copy it to keep it)."""
        if self.cache is None:
            raise QConvertError("decode before prefill: call prefill with the prompts first")
        if self.length >= self.max_len:
            raise QConvertError(f"the engine's {self.max_len} columns are full; make a longer IntegerDecodeEngine")
        from qconvert.engine import check_next

        b = self.batch
        check_next(next_ids, b)
        self._ids[:b].copy_(next_ids.reshape(b, 1))
        self._column.fill_(self.length)
        if self.graphs:
            graph = self._graph_of.get(b) or self._capture(b)
            graph.replay()
            logits = self._logits[:b]
        else:
            logits = self._step(b, wide=self._wide)
        self.length += 1
        self._seq().length = self.length
        return logits

    def _step(self, b: int, wide: bool) -> torch.Tensor:
        """One decode step of ``b`` rows on ``_ids``; ``wide``: at the device column ``_column``, over
        all columns and branch-free (device ops only: what a graph captures), else over the filled ones."""
        seq = self._seq()
        seq.column = self._column if wide else None
        try:
            if not wide:
                return self.model.logits(self._ids[:b], seq, last_only=True)[:, -1]
            with sync_free():
                logits = self.model.logits(self._ids[:b], seq, last_only=True)[:, -1]
            if self._logits is not None:
                self._logits[:b].copy_(logits)
                logits = self._logits[:b]
            return logits
        finally:
            seq.column = None
            seq.length = self.length

    def _capture(self, b: int):
        """Warm up (kernels compiled, cuBLAS handles made, outside the capture), then capture the
        decode step of ``b`` rows.  Both write the new token's keys and values at ``_column``: the
        ones the replay writes again."""
        from qconvert.engine import capture_step

        graph, self._pool = capture_step(lambda: self._step(b, wide=True), self.device, self._pool)
        self._graph_of[b] = graph
        return graph
