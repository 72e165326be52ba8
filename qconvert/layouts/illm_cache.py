"""The KV cache of I-LLM's integer-only model and its decode engine (``qconvert generate``).

The rows of a batch run together (``IntegerLlama.forward_int`` on [b, t] ids); a cache is a list
of groups of rows, each a ``SequenceCache`` whose tensors lead with the group's rows (one group
of every row, left-padded prompts included, as the engine and ``forward`` make them).  Per block
it holds what attention reads, as the model made it:

    keys    int8 [b, KV, T, head_dim] after the integer RoPE, one dyadic scale per head and token
            (m, k int64 [b, KV, T, 1])
    values  int8 [b, KV, T, head_dim], one dyadic scale per head and token

No scale spans tokens or rows (``IntegerLlama._attn_block``), so a cached step of a batch
computes, bit for bit, what each row's whole sequence run alone computes for its new tokens
(tests/test_illm.py).  Memory per token and block: 2 x kv_heads x (head_dim + 16) bytes
(SmolLM2-135M: 30 blocks x 3 heads of 64 -> 14 KiB per token).
"""

from __future__ import annotations

import torch

from qconvert.errors import QConvertError
from qconvert_kernels.illm.reference import Dyadic


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


class IntegerKVCache:
    """The cache of a batch of ``rows``: groups of rows (``(row indices, SequenceCache)``) that
    run together.  ``groups=None``: one group of every row, as ``IntegerLlama.forward`` and the
    decode engine make it (``pad``: each row's left padding, for the engine's prompts)."""

    def __init__(self, rows: int, blocks: int, groups: list[list[int]] | None = None, pad: torch.Tensor | None = None):
        self.batch, self.blocks_n = rows, blocks
        groups = [list(range(rows))] if groups is None else groups
        if sorted(r for g in groups for r in g) != list(range(rows)) or not all(groups):
            raise QConvertError(f"IntegerKVCache groups {groups} must split rows 0..{rows - 1} once each")
        if pad is not None and (len(groups) != 1 or tuple(pad.shape) != (rows,) or pad.dtype != torch.int64):
            raise QConvertError(f"IntegerKVCache: left padding is int64 [{rows}] (got {pad.dtype} {tuple(pad.shape)}) "
                                "and goes with one group of every row")
        self.groups = [(g, SequenceCache(blocks, pad)) for g in groups]

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
    interface of ``qconvert.engine.DecodeEngine`` that ``qconvert.generate`` uses.  On the model's
    device (a GPU: its kernels, launched eagerly), no CUDA graphs.  All rows run as one batch; a
    row's left padding (``attention_mask``) takes no part in its attention and its positions count
    from its first real token, so each row computes the bits of its prompt alone."""

    graphs = False

    def __init__(self, model, max_batch: int, max_len: int):
        if max_batch < 1 or max_len < 2:
            raise QConvertError(f"IntegerDecodeEngine(max_batch={max_batch}, max_len={max_len}): need max_batch >= 1 "
                                "and max_len >= 2")
        if max_len > model.max_positions:
            raise QConvertError(f"max_len {max_len} is longer than the model's {model.max_positions} positions; "
                                "generate fewer tokens")
        self.model, self.config = model, model.config
        self.device = model.device
        self.max_batch, self.max_len = max_batch, max_len
        self.cache: IntegerKVCache | None = None
        self.batch = self.length = 0

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` [B, t] through the model as one batch on the cache: the last logits [B, V]."""
        (_, seq), = self.cache.groups
        return self.model.logits(ids, seq, last_only=True)[:, -1]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start new sequences from left-padded prompts (``input_ids`` [B, P], ``attention_mask`` [B, P]
        1 on tokens, 0 on the padding, or None): logits [B, V] of each row's last token."""
        from qconvert.engine import left_padding  # (transformers: imported when generating only)

        pad = left_padding(input_ids, attention_mask, self.max_batch, self.max_len, type(self).__name__)
        b, t = input_ids.shape
        padded = bool(pad.any())
        self.cache = IntegerKVCache(b, self.model.layers_n, pad=pad.to(self.device) if padded else None)
        self.batch, self.length = b, t
        return self._run(input_ids.to(self.device))

    @torch.inference_mode()
    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        """One token per row ([B] or [B, 1]): logits [B, V]."""
        if self.cache is None:
            raise QConvertError("decode before prefill: call prefill with the prompts first")
        if self.length >= self.max_len:
            raise QConvertError(f"the engine's {self.max_len} columns are full; make a longer IntegerDecodeEngine")
        from qconvert.engine import check_next

        check_next(next_ids, self.batch)
        ids = next_ids.reshape(self.batch, 1).to(self.device)
        self.length += 1
        return self._run(ids)
