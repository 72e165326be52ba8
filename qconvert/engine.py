"""The decode engine: a static KV cache, explicit masks and positions, one CUDA graph per decode step.

One harness for the float original and every quantized OUT (``qconvert.load``), so their speeds
compare like with like; bench, ``qconvert generate`` and ``--calib self`` drive it the same way::

    from qconvert.engine import DecodeEngine

    eng = DecodeEngine(model, max_batch=128, max_len=512)   # device and dtype: the model's
    logits = eng.prefill(ids)              # int64 [b, P] (b <= max_batch), optional attention_mask
                                           # [b, P] (1 = token, 0 = left padding) -> float [b, V]
    for _ in range(n):
        nxt = logits.argmax(-1)            # or torch.multinomial(...): any [b] int64 on the device
        logits = eng.decode(nxt)           # [b, V]: the next position's logits
    eng.length                             # cache columns filled (P + decode steps so far)

``decode`` returns, on the graph path, a view of the engine's static logits buffer: read it (or
``.clone()`` it) before the next call.  ``prefill`` starts new sequences (the cache is reused, not
reallocated).  The first ``decode`` of each batch size on CUDA captures its graph (a warm-up step
and a capture, ~1 s): time a warm-up round first.  ``qconvert.generate.generate`` is the
text-level loop (tokenize, sample, EOS, tokens/s).

``--calib self`` (qconvert.calibration_text) on the engine, the same sampling as today::

    eng = DecodeEngine(model, max_batch=min(SELF_BATCH, nsamples), max_len=seqlen)  # once
    logits = eng.prefill(ids[:b, :1])                    # the random first tokens
    for t in range(1, seqlen):
        lg = logits[:, :vocab].float()
        ids[:b, t] = lg.argmax(-1) if t <= SELF_GREEDY else sample(lg, g)  # calibration_text.sample
        if t < seqlen - 1:
            logits = eng.decode(ids[:b, t])

bench: ``eng.prefill(prompt)`` then ``eng.decode(nxt)`` in the timed loop, for the float and the
quantized model alike (one engine per model; ``graphs`` None picks graphs on CUDA).

Design
------
- **Cache.**  ``StaticKVCache``: per layer K and V ``[max_batch, kv_heads, max_len, head_dim]`` in
  the model's dtype, allocated once.  It subclasses transformers' ``Cache`` only so that the
  models' ``isinstance`` checks pass; what the decoder layers call is one method,
  ``update(key, value, layer_idx, ...) -> (keys, values)``, the protocol attention layers have
  used since transformers 4.36 (tested here with the installed 5.24).  The engine, not the cache,
  decides where new columns go (``write``, an int64 device tensor, ``index_copy_``) and how many
  columns attention reads (``kv_len``).  transformers' own ``StaticCache`` is not used: its
  constructor and bookkeeping have changed from release to release (5.x allocates lazily at the
  first ``update`` and advances one write position per layer inside ``update``, the same for all
  rows), and a model given no 4-D mask asks it for mask sizes through a protocol that changes
  too.  With the same masks, the engine's logits are bit-identical to transformers'
  ``DynamicCache`` forward, for the float model and every quantized layout (tests/test_engine.py).
- **Masks and positions are the engine's.**  Every forward gets a ready 4-D additive mask
  (0 = attend, ``finfo(dtype).min`` = not) and explicit ``position_ids``, so transformers' mask code
  (``create_causal_mask`` returns a 4-D mask as it is) and its position code never run.  That code
  is where the host syncs are: given a 2-D padding mask, transformers 5.24 asks
  ``padding_mask.all()`` in ``_ignore_causal_mask_sdpa`` (masking_utils.py) at every step.
- **Batches of different prompt lengths: left padding.**  Row ``b`` with ``pad_b`` pad columns has
  its tokens in cache columns ``pad_b .. P-1`` at positions ``0 ..``; every new token of every row
  goes to the same column ``length`` at position ``length - pad_b``.  Pad columns are masked for all
  queries except their own (a pad query attends to itself only, so no softmax row is empty and no
  NaN is ever written to the cache).  A masked column gets weight exp(min - max) = 0 exactly, so a
  padded row computes what it computes alone, up to the summation order of differently shaped
  matmuls (tests/test_engine.py measures it).
- **Decode step** (``_step``): ``mask[:, :, :, col] = 0``; forward one token per row
  (``write = col``, positions from the static buffer); logits to the static buffer;
  ``positions += 1``, ``col += 1``, all on the device.  The host keeps its own copy of the length
  (``self.length``), so nothing is read back.  On CPU attention reads columns ``[0, length]`` (a
  view); under a CUDA graph all ``max_len`` columns (the mask hides the unused ones), since shapes
  are frozen at capture.
- **CUDA graphs**: one per batch size, captured at the first ``decode`` of that size (a warm-up
  step on a side stream first: cuBLAS handles, CuPy kernels compiled; the positions and column it
  advances are put back; the K/V it writes are the ones the real step writes again), all graphs in
  one memory pool.  Capture runs under ``host_sync_guard`` (inside ``torch.cuda.graph``, whose own
  entry synchronizes: ``capturing``): a host sync inside the step would break capture, and the
  guard names the culprit.  Prefill stays eager: its GEMMs are large, its
  launch overhead small, and its shape changes with every prompt.
- **Not captured**: MoE models (transformers' and qconvert's expert loops read the routing back to
  the host: ``nonzero().tolist()``); they run eager (``graphs=None``) or refuse ``graphs=True``.
  Sliding-window attention shorter than ``max_len`` and anything but a transformers model (I-LLM's
  integer-only model, which has its own engine: qconvert/layouts/illm_cache.py) are refused with a
  ``QConvertError``.
- **CuPy kernels on the graph's stream**: every launcher goes through
  ``qconvert_kernels/launch.py`` ``launch``, which runs the kernel on CuPy's handle of
  ``torch.cuda.current_stream(device)`` (``launch.cupy_stream``); during capture
  ``current_stream`` is the capturing stream, so the launches are recorded in the graph.  Kernel
  modules compile, shared-memory limits are set and W4A8 layers repack their weights
  (``prepare_cuda``, which may read device values) in the warm-up step, before the capture; the
  W4A8 decode kernel's workspace resets itself at the end of each launch, so a replay finds it
  zeroed.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from qconvert.errors import QConvertError
from qconvert.moe import is_moe

try:  # the models' isinstance checks want a transformers Cache
    from transformers.cache_utils import Cache as _HFCache
except ImportError:  # pragma: no cover - transformers is a dependency
    _HFCache = object


# ---------------------------------------------------------------------------------------------
# host-sync guard


class HostSyncError(RuntimeError):
    """A host synchronisation inside a step that must not have one (a CUDA graph's decode step)."""


_GUARDED_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__index__", "__float__")


@contextlib.contextmanager
def host_sync_guard(strict: bool = False):
    """Make host syncs raise ``HostSyncError`` inside the ``with`` block.

    Guarded: ``Tensor.item``, ``tolist``, ``numpy``, ``bool(t)``, ``int(t)``, ``operator.index(t)``,
    ``float(t)``, ``t.cpu()``, ``t.to("cpu")`` and ``t.nonzero()`` / ``torch.nonzero`` (a
    data-dependent shape), and ``torch.cuda.synchronize``.  By default only on CUDA tensors (the
    syncs that break graph capture); ``strict=True`` raises on tensors of any device: the mock the
    CPU tests use, so that a sync added to the step shows on a machine without a GPU (on CPU
    ``.cpu()`` / ``.to("cpu")`` are no-ops and stay allowed).

    The patches are process-wide (``torch.Tensor`` attributes), so keep the block to the step.
    """

    def hit(t: torch.Tensor) -> bool:
        return strict or (isinstance(t, torch.Tensor) and t.is_cuda)

    saved: dict[str, object] = {}
    own = torch.Tensor.__dict__

    def patch(name: str, make):
        saved[name] = own.get(name, _MISSING)
        original = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, make(name, original))

    def raising(name, original):
        def method(self, *args, **kwargs):
            if hit(self):
                raise HostSyncError(f"Tensor.{name} on a {self.device} tensor {tuple(self.shape)} inside the decode step "
                                    "(a host sync: it reads a value back to Python)")
            return original(self, *args, **kwargs)

        return method

    def to_host(name, original):
        def method(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if self.device.type != "cpu" and isinstance(out, torch.Tensor) and out.device.type == "cpu":
                raise HostSyncError(f"Tensor.{name} copies a {self.device} tensor {tuple(self.shape)} to the host "
                                    "inside the decode step")
            return out

        return method

    sync_fn = torch.cuda.synchronize
    nonzero_fn = torch.nonzero

    def no_sync(*args, **kwargs):
        raise HostSyncError("torch.cuda.synchronize inside the decode step")

    def guarded_nonzero(t, *args, **kwargs):
        if hit(t):
            raise HostSyncError(f"torch.nonzero on a {t.device} tensor {tuple(t.shape)} inside the decode step "
                                "(its output shape depends on the data)")
        return nonzero_fn(t, *args, **kwargs)

    try:
        for name in _GUARDED_METHODS + ("nonzero",):
            patch(name, raising)
        for name in ("cpu", "to"):
            patch(name, to_host)
        torch.cuda.synchronize = no_sync
        torch.nonzero = guarded_nonzero
        yield
    finally:
        torch.cuda.synchronize = sync_fn
        torch.nonzero = nonzero_fn
        for name, value in saved.items():
            if value is _MISSING:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, value)


_MISSING = object()


@contextlib.contextmanager
def capturing(graph, pool):
    """Capture into ``graph`` (memory from ``pool``) with host syncs refused (``host_sync_guard``).
    ``torch.cuda.graph`` synchronizes the device as it starts, which the guard would refuse: the
    guard comes inside it."""
    with torch.cuda.graph(graph, pool=pool), host_sync_guard():
        yield


def capture_step(step, device: torch.device, pool, after_warm_up=None):
    """A decode step as a CUDA graph: ``step()`` once on a side stream under the guard (kernels
    compiled, cuBLAS handles made, outside the capture), ``after_warm_up()`` (puts back what the
    warm-up advanced), then ``step()`` captured.  Returns (graph, pool); ``pool`` None: a new one."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), host_sync_guard():
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    if after_warm_up is not None:
        after_warm_up()
    pool = torch.cuda.graph_pool_handle() if pool is None else pool
    graph = torch.cuda.CUDAGraph()
    with capturing(graph, pool):
        step()
    return graph, pool


# ---------------------------------------------------------------------------------------------
# the cache


class StaticKVCache(_HFCache):
    """K and V of every layer, ``[max_batch, kv_heads, max_len, head_dim]``, allocated once.

    The engine sets, before each forward: ``rows`` (the batch rows in use), ``write`` (int64
    [q] device tensor: the cache columns the q new tokens go to) and ``kv_len`` (the columns
    ``update`` hands to attention).  ``update`` writes in place and returns views: no copy,
    no allocation, no host sync.  On ``kernel_device`` it writes keys and values in one launch
    (``qconvert_kernels.kvcache``, the same copy as the two ``index_copy_`` it replaces).
    """

    is_compileable = True  # transformers asks this of caches; nothing here depends on it

    def __init__(self, n_layers: int, max_batch: int, kv_heads: int, max_len: int, k_dim: int, v_dim: int,
                 dtype: torch.dtype, device: torch.device):
        try:  # transformers 5: a Cache is a list of layers; ours keeps its own tensors
            super().__init__(layers=[])
        except TypeError:  # transformers 4: Cache() takes no arguments
            super().__init__()
        self.n_layers, self.max_batch, self.max_len = n_layers, max_batch, max_len
        self.kv_shape = (kv_heads, k_dim, v_dim)
        self.key_cache = [torch.zeros(max_batch, kv_heads, max_len, k_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.value_cache = [torch.zeros(max_batch, kv_heads, max_len, v_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.rows = max_batch
        self.kv_len = 0
        self.seen = 0  # columns filled before the current forward (the engine's host-side count)
        self.write: torch.Tensor | None = None
        self.checked = False
        # where update writes through kvcache.cu (one launch for keys and values) instead of two
        # index_copy_: the engine's device when it has the kernel, else None
        self.kernel_device: torch.device | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key_cache + self.value_cache)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self.checked:
            want = (self.rows, self.kv_shape[0], int(self.write.shape[0]))
            if (tuple(key_states.shape[:3]) != want or key_states.shape[3] != self.kv_shape[1]
                    or value_states.shape[3] != self.kv_shape[2] or key_states.dtype != self.key_cache[0].dtype):
                raise QConvertError(f"the decode engine expected keys {want + (self.kv_shape[1],)} "
                                    f"{self.key_cache[0].dtype} from layer {layer_idx}, the model gave "
                                    f"{tuple(key_states.shape)} {key_states.dtype}; this attention layout is not supported")
            self.checked = True
        k = self.key_cache[layer_idx][: self.rows]
        v = self.value_cache[layer_idx][: self.rows]
        if self.kernel_device is not None and key_states.device == self.kernel_device:
            from qconvert_kernels.kvcache import cuda as kkv

            if kkv.problem(key_states, value_states, self.write, k, v) is None:
                kkv.kv_write(key_states, value_states, self.write, k, v)  # one launch for both
                return k[:, :, : self.kv_len], v[:, :, : self.kv_len]
        k.index_copy_(2, self.write, key_states)
        v.index_copy_(2, self.write, value_states)
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]

    # what else transformers may ask of a cache (the engine passes masks and positions itself)
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def __len__(self) -> int:
        return self.n_layers


# ---------------------------------------------------------------------------------------------
# the engine


def _sliding_window(config) -> int | None:
    """The attention window in effect, or None for full attention in every layer."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return int(window) if "sliding_attention" in types else None
    return int(window) if getattr(config, "use_sliding_window", True) else None


def keyword_of(fn, *names: str) -> str | None:
    """The first of ``names`` that ``fn`` takes (transformers renames keywords across versions: ``cache``
    for ``past_key_values`` since 5.25), None if it takes none."""
    params = inspect.signature(fn).parameters
    return next((n for n in names if n in params), None)


def left_padding(ids: torch.Tensor, attention_mask: torch.Tensor | None, max_batch: int, max_len: int,
                 engine: str) -> torch.Tensor:
    """Check a prefill's prompts (ids [b, P], left padding) against an engine's size: the pad count of each row."""
    if ids.dim() != 2:
        raise QConvertError(f"prefill takes token ids [batch, length], got shape {tuple(ids.shape)}")
    b, p = ids.shape
    if not 1 <= b <= max_batch:
        raise QConvertError(f"prefill of {b} prompts: the engine holds 1 to {max_batch}; make a larger {engine}")
    if not 1 <= p < max_len:
        raise QConvertError(f"prompt of {p} tokens: the engine's max_len is {max_len} (prompt + new tokens); "
                            f"make a longer {engine}")
    if attention_mask is None:
        return torch.zeros(b, dtype=torch.int64, device=ids.device)
    am = attention_mask.to(ids.device).bool()
    if am.shape != ids.shape:
        raise QConvertError(f"attention_mask {tuple(am.shape)} does not match input_ids {tuple(ids.shape)}")
    pad = p - am.sum(1)
    cols = torch.arange(p, device=ids.device)
    if not bool(torch.equal(am, cols[None, :] >= pad[:, None])) or int(pad.max()) >= p:
        raise QConvertError("attention_mask must be left padding (0s, then 1s, at least one 1 per row); "
                            "pad prompts on the left")
    return pad


def cache_kernel_usable(device: torch.device) -> bool:
    """Whether the KV-cache kernel can run on ``device``: a CUDA device of sm_80+ with cupy, or the
    CPU under a kernel emulator's launch hook.  ``DecodeEngine`` writes its cache through it there
    unless told not to, and ``qconvert bench`` says so in its result."""
    from qconvert_kernels import launch

    if device.type == "cuda":
        return launch.available(80) and (launch.capability(device.index or 0) or 0) >= 80
    return launch.current_hook() is not None


def check_next(next_ids: torch.Tensor, b: int) -> None:
    if next_ids.numel() != b:
        raise QConvertError(f"decode takes one token per row ({b}), got shape {tuple(next_ids.shape)}")


class DecodeEngine:
    """Prefill and one-token decode steps of a causal LM over a static KV cache.

    ``model``: a transformers causal LM in eval mode (the float original, or ``qconvert.load(OUT)``).
    ``max_batch`` rows and ``max_len`` cache columns (prompt, left padding included, plus new tokens)
    are allocated once.  ``device`` / ``dtype`` default to the model's and must match it (the engine
    never casts a model: that would change a quantized layer's float scales).  ``graphs``: capture
    each decode step as a CUDA graph (None: on CUDA for models without MoE routing, never on CPU).
    ``cache_kernel``: write each layer's new keys and values into the cache in one kernel launch
    (``qconvert_kernels.kvcache``) instead of two ``index_copy_`` (None: on a CUDA device the
    kernels can use; True elsewhere only under the kernel emulator).
    """

    def __init__(self, model, max_batch: int, max_len: int, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, graphs: bool | None = None,
                 cache_kernel: bool | None = None):
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise QConvertError(f"{type(model).__name__} is not a transformers causal LM, which the decode engine needs; "
                                "an I-LLM OUT loads as its integer-only model, which brings its own "
                                "(model.decode_engine(max_batch, max_len)): qconvert.load(OUT, integer=False) "
                                "gives the float model with the same quantized layers")
        config = model.config
        emb = model.get_input_embeddings()
        if max_batch < 1 or max_len < 2:
            raise QConvertError(f"DecodeEngine(max_batch={max_batch}, max_len={max_len}): need max_batch >= 1 and max_len >= 2")
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise QConvertError(f"max_len {max_len} is longer than the model's {limit} positions; generate fewer tokens")
        window = _sliding_window(config)
        if window is not None and max_len > window:
            raise QConvertError(f"{config.model_type} uses sliding-window attention of {window} tokens, which the decode "
                                f"engine does not implement; keep prompt + new tokens within {window}")
        model_device, model_dtype = emb.weight.device, emb.weight.dtype
        self.device = torch.device(device) if device is not None else model_device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device != model_device:
            raise QConvertError(f"the model is on {model_device}, not {self.device}; load it on the engine's device "
                                f"(qconvert.load(OUT, device='{self.device.type}'))")
        self.dtype = dtype or model_dtype
        if self.dtype != model_dtype:
            raise QConvertError(f"the model computes in {model_dtype}, not {self.dtype}; load it with dtype={self.dtype} "
                                "or leave the engine's dtype unset")
        moe = is_moe(config)
        if graphs is None:
            graphs = self.device.type == "cuda" and not moe
        if graphs and moe:
            raise QConvertError(f"{config.model_type} routes tokens to experts with host syncs (nonzero, tolist), which a "
                                "CUDA graph cannot capture; use graphs=None to run its decode steps eagerly")
        if graphs and self.device.type != "cuda":
            raise QConvertError("CUDA graphs need a CUDA device; use graphs=False (or None) on CPU")
        self.model, self.config, self.graphs = model, config, bool(graphs)
        self.max_batch, self.max_len = max_batch, max_len
        self.vocab = config.vocab_size

        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.cache = StaticKVCache(config.num_hidden_layers, max_batch, kv_heads, max_len, head_dim, head_dim,
                                   self.dtype, self.device)
        usable = cache_kernel_usable(self.device)
        if cache_kernel is None:
            cache_kernel = self.device.type == "cuda" and usable
        elif cache_kernel and not usable:
            raise QConvertError(f"cache_kernel=True: the KV-cache kernel runs on a CUDA device with cupy (sm_80+), "
                                f"not on {self.device}" + ("" if self.device.type == "cuda" else
                                                           " (the CPU only under the kernel emulator)")
                                + "; leave cache_kernel unset")
        self.cache.kernel_device = self.device if cache_kernel else None
        self._cache_kw = keyword_of(model.forward, "cache", "past_key_values")
        if self._cache_kw is None:
            raise QConvertError(f"{type(model).__name__}.forward takes no KV cache; the decode engine cannot run it")
        self._keep_kw = keyword_of(model.forward, "logits_to_keep", "num_logits_to_keep")

        dev = self.device
        self._ids = torch.zeros(max_batch, 1, dtype=torch.int64, device=dev)  # decode input tokens
        self._pos = torch.zeros(max_batch, 1, dtype=torch.int64, device=dev)  # their positions
        self._col = torch.zeros(1, dtype=torch.int64, device=dev)  # the cache column they go to
        self._mask = torch.full((max_batch, 1, 1, max_len), torch.finfo(self.dtype).min, dtype=self.dtype, device=dev)
        self._logits = torch.zeros(max_batch, self.vocab, dtype=self.dtype, device=dev) if self.graphs else None
        self._graph_of: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.batch = 0  # rows of the current sequences
        self.length = 0  # cache columns filled

    # -- prefill --------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Start ``b`` new sequences from left-padded prompts; the logits at their last position.

        ``input_ids`` int64 [b, P]; ``attention_mask`` [b, P], 1 on tokens and 0 on the left
        padding (None: no padding).  Returns float [b, V] (``all_logits``: [b, P, V], pad positions
        included).  Host syncs are allowed here (the pad counts are read once).
        """
        dev = self.device
        ids = input_ids.to(dev, torch.int64)
        pad = left_padding(ids, attention_mask, self.max_batch, self.max_len, type(self).__name__)
        b, p = ids.shape
        cols = torch.arange(p, device=dev)
        allowed = (cols[None, :] <= cols[:, None])[None] & (cols[None, None, :] >= pad[:, None, None])
        allowed |= torch.eye(p, dtype=torch.bool, device=dev)[None]  # a pad query sees itself: no empty softmax row
        minv = torch.finfo(self.dtype).min
        mask = torch.zeros(b, 1, p, p, dtype=self.dtype, device=dev).masked_fill_(~allowed[:, None], minv)
        positions = (cols[None, :] - pad[:, None]).clamp_(min=0)

        self.cache.rows, self.cache.kv_len, self.cache.write, self.cache.seen = b, p, cols, 0
        self.cache.checked = False
        out = self._forward(ids, mask, positions, None if all_logits else 1)
        logits = out.logits if all_logits else out.logits[:, -1]

        # decode state: the next token of row r goes to column p at position p - pad[r]
        self._mask[:b].fill_(minv)
        self._mask[:b, 0, 0, :p].masked_fill_(cols[None, :] >= pad[:, None], 0.0)
        self._pos[:b, 0] = p - pad
        self._col.fill_(p)
        self.batch, self.length = b, p
        return logits

    # -- decode ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``next_ids`` int64 [b] or [b, 1] on the engine's device);
        the logits [b, V] at the new position.  No host sync on the way."""
        if self.batch == 0:
            raise QConvertError("decode before prefill: start the sequences with engine.prefill(ids)")
        if self.length >= self.max_len:
            raise QConvertError(f"the cache is full ({self.max_len} columns); make a DecodeEngine with a larger max_len")
        b = self.batch
        check_next(next_ids, b)
        self._ids[:b].copy_(next_ids.reshape(b, 1))
        self.cache.seen = self.length
        if self.graphs:
            graph = self._graph_of.get(b) or self._capture(b)
            graph.replay()
            logits = self._logits[:b]
        else:
            logits = self._step(b, self.length + 1)
        self.length += 1
        return logits

    def _forward(self, ids, mask, positions, keep):
        kwargs = {self._cache_kw: self.cache, "use_cache": True}
        if self._keep_kw and keep is not None:
            kwargs[self._keep_kw] = keep
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)

    def _step(self, b: int, kv_len: int) -> torch.Tensor:
        """One decode step on the static buffers: device ops only (what a graph captures)."""
        mask = self._mask[:b]
        mask.index_fill_(3, self._col, 0.0)  # the new column is visible to its own row
        self.cache.rows, self.cache.kv_len, self.cache.write = b, kv_len, self._col
        out = self._forward(self._ids[:b], mask[..., :kv_len], self._pos[:b], 1)
        logits = out.logits[:, -1]
        if self._logits is not None:
            self._logits[:b].copy_(logits)
            logits = self._logits[:b]
        self._pos[:b].add_(1)
        self._col.add_(1)
        return logits

    def _capture(self, b: int):
        """Warm up, then capture the decode step of ``b`` rows (attention over all max_len columns)."""
        pos, col = self._pos.clone(), self._col.clone()

        def put_back():
            self._pos.copy_(pos)
            self._col.copy_(col)

        graph, self._pool = capture_step(lambda: self._step(b, self.max_len), self.device, self._pool, put_back)
        self._graph_of[b] = graph
        return graph
