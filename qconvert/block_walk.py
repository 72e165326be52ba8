"""Sequential calibration: block inputs captured once, each block observed, quantized, re-run.

For a method that needs calibration (GPTQ-based schemes), the pipeline walks the decoder
blocks in order with the calibration activations X_i (the input of block i):

1. the block's weights are read from the source into a real module (float32);
2. X_i runs through it with a forward pre-hook on every target linear, which accumulates
   S = Σ xᵀx and the row count; H = 2 S / rows.  Linears that read the very same input
   tensor one after the other (q/k/v, gate/up, an expert's gate/up) share one accumulator
   and are solved together;
3. mixture-of-experts: an expert that the router sent fewer tokens than its input width
   (its H would be rank-deficient) is observed again on *all* calibration tokens, by a
   second pass that pushes every token through it for statistics only (the block's output
   still uses the router's choice); a warning names it;
4. the method quantizes the block's linears; their dequantized weights go back into the
   block, with the method's run-time activation quantization as a pre-hook, so that
5. X_{i+1} = block(X_i) is computed through the block *as it will run*, and feeds the next.

Memory is one block, its Hessians and two activation buffers [nsamples, seqlen, hidden] in
float32 (with ``asym``, asymmetric calibration: a float copy of the block and two more buffers
for the float model's activations, placed and saved like the first two).  The buffers are kept
in RAM while both fit ``max_memory``; above it they are files in OUT.partial mapped into memory, which the kernel pages to disk.  Either way the current
buffer is also what ``--resume`` restarts from: with files nothing is copied; in RAM it is
saved to OUT.partial after each block.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import time
import zlib
from pathlib import Path

import torch
from torch import nn

from qconvert import placement
from qconvert.errors import QConvertError
from qconvert.architectures import DECODER_LAYERS
from qconvert.source import Source

log = logging.getLogger("qconvert")

CALIB_DIR = "calib"
FLOAT_DIR = "float"  # under CALIB_DIR: the float model's block inputs (asymmetric calibration)
BATCH_TOKENS = 4096  # tokens per calibration batch (whole sequences: at least one)


class _Stop(Exception):
    pass


class ActivationBuffers:
    """Two float32 buffers [n, L, H] (block input and output): on the GPU ("gpu"), in pinned
    ("pinned") or plain ("ram") CPU memory, or file-backed ("disk"); qconvert/placement.py."""

    def __init__(self, directory: Path, shape: tuple[int, int, int], place: str,
                 device: torch.device = torch.device("cpu")):
        self.dir = directory
        self.shape = shape
        self.place = place
        self.on_disk = place == "disk"
        self.device = device
        directory.mkdir(exist_ok=True)
        self.bufs = [self._make(i) for i in range(2)]
        self.current = 0  # index of the buffer that holds the next block's input

    def _path(self, i: int) -> Path:
        return self.dir / f"acts{i}.f32"

    def _make(self, i: int) -> torch.Tensor:
        numel = self.shape[0] * self.shape[1] * self.shape[2]
        if self.place == "gpu":
            return torch.empty(self.shape, device=self.device)
        if self.place == "pinned":
            return torch.empty(self.shape, device="cpu", pin_memory=True)
        if not self.on_disk:
            return torch.empty(self.shape, device="cpu")
        path = self._path(i)
        with open(path, "ab") as f:  # sized without writing: a sparse file
            f.truncate(numel * 4)
        return torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32).view(self.shape)

    @property
    def inputs(self) -> torch.Tensor:
        return self.bufs[self.current]

    @property
    def outputs(self) -> torch.Tensor:
        return self.bufs[1 - self.current]

    def swap(self) -> None:
        self.current = 1 - self.current

    def checkpoint(self) -> dict:
        """Make the current input durable for --resume; returns what the journal records."""
        state = {"buffer": self.current, "on_disk": self.on_disk}
        if not self.on_disk:  # one file per buffer: the journal's last record keeps pointing at a whole one
            data = memoryview(self.inputs.cpu().numpy()).cast("B")
            tmp = self.dir / "saved.tmp"
            with open(tmp, "wb") as f:  # no fsync: a killed process loses nothing; after a power cut
                f.write(data)  # the checksum tells a torn file from a whole one
            os.replace(tmp, self.dir / f"saved{self.current}.f32")
            state["crc32"] = zlib.crc32(data)
        return state

    def restore(self, state: dict) -> None:
        self.current = int(state["buffer"])
        if not self.on_disk:
            saved = self.dir / f"saved{self.current}.f32"
            ok = saved.is_file() and saved.stat().st_size == self.inputs.numel() * 4
            if ok:
                data = torch.from_file(str(saved), shared=False, size=self.inputs.numel(), dtype=torch.float32)
                ok = zlib.crc32(memoryview(data.numpy()).cast("B")) == state.get("crc32")
                self.inputs.copy_(data.view(self.shape))
            if not ok:
                raise QConvertError(f"{saved} is damaged (the machine stopped while it was written); "
                                    "pass --force to start over")


class Calibrator:
    """Runs calibration activations through the decoder blocks (see the module docstring)."""

    def __init__(self, src: Source, skeleton: nn.Module, names: dict[str, str], tokens: torch.Tensor,
                 partial: Path, max_memory: int, batch_tokens: int = BATCH_TOKENS, progress: bool = True,
                 on_disk: bool | None = None, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu"), max_gpu_memory: int = 0, asym: float = 0.0):
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise QConvertError(f"calibration compute dtype {compute_dtype} is not supported; use float32 or bfloat16")
        self.compute_dtype = compute_dtype  # bfloat16: the blocks' matmuls run under autocast
        self.device = torch.device(device)
        self.src = src
        self.model = skeleton
        self.names = names  # skeleton tensor name -> source tensor name
        self.tokens = tokens
        self.progress = progress
        n, seqlen = tokens.shape
        hidden = skeleton.config.hidden_size
        cuda = self.device.type == "cuda"
        # GPU, then pinned / plain RAM, then files (qconvert/placement.py); a resumed run keeps
        # its activations in files if they were there, and in memory if they were not
        self.asym = float(asym)  # GPTAQ's α: > 0 also runs the float model's blocks (asymmetric calibration)
        need = (4 if self.asym else 2) * n * seqlen * hidden * 4
        if on_disk:
            place, self.gpu_left, self.ram_left = "disk", max_gpu_memory, max_memory
        else:
            place, self.gpu_left, self.ram_left = placement.place(need, max_gpu_memory, max_memory, cuda)
            if place == "disk" and on_disk is False:
                place, self.ram_left = ("pinned" if cuda else "ram"), self.ram_left - need
        self.acts = ActivationBuffers(partial / CALIB_DIR, (n, seqlen, hidden), place, self.device)
        # asymmetric calibration: the same samples through the float blocks, the target of every solve
        self.float_acts = (ActivationBuffers(partial / CALIB_DIR / FLOAT_DIR, (n, seqlen, hidden), place, self.device)
                           if self.asym else None)
        self._mlp_cache: torch.Tensor | None = None
        self._block_buffers: list = []
        self._online_hooks: list = []
        self.batch = max(1, batch_tokens // seqlen)
        self._kwargs: dict[int, dict] = {}  # batch size -> {layer type: the keyword arguments of such a block}
        self.layers = skeleton.get_submodule(DECODER_LAYERS)
        # Gemma-2 / 3 alternate sliding-window and global layers, each kind with its own mask (and,
        # in Gemma-3, its own rotary tables): the kwargs are caught once per kind (``_catch``)
        self.layer_types = list(getattr(skeleton.config, "layer_types", None) or [])[: len(self.layers)]
        self.seconds = {"forward": 0.0}

    def checkpoint(self) -> dict:
        """Make the next block's inputs durable for --resume; returns what the journal records."""
        state = self.acts.checkpoint()
        if self.float_acts is not None:
            state["float"] = self.float_acts.checkpoint()
        return state

    def restore(self, state: dict) -> None:
        self.acts.restore(state)
        if self.float_acts is not None:
            self.float_acts.restore(state["float"])

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the walk's device (a view of ``t`` itself when it is there already)."""
        if t.device == self.device:
            return t
        return t.to(self.device, non_blocking=t.is_pinned())

    def _real(self, t: torch.Tensor) -> torch.Tensor:
        """A source tensor as the walk computes with it: float32 on the walk's device (converted
        there, so a GPU run never holds a float32 copy in CPU memory)."""
        return t.float() if self.device.type == "cpu" else t.to(self.device).float()

    # ---- block inputs -------------------------------------------------------------------
    def embed(self, fill: bool = True) -> None:
        """Block-0 inputs of every sample into the input buffer (``fill``), and the keyword
        arguments transformers hands a block (rotary tables, mask) for each batch size."""
        t0 = time.perf_counter()
        emb = self.model.get_input_embeddings()
        name = self._tensor_name(emb, "weight")
        emb.weight = nn.Parameter(self._real(self.src.get(self.names[name])), requires_grad=False)
        try:
            for start in range(0, self.tokens.shape[0], self.batch):
                ids = self.tokens[start : start + self.batch]
                if not fill and len(ids) in self._kwargs:
                    continue
                hidden, kwargs = self._catch(ids)
                if fill:
                    self.acts.inputs[start : start + len(ids)] = hidden
                    if self.float_acts is not None:
                        self.float_acts.inputs[start : start + len(ids)] = hidden
                self._kwargs.setdefault(len(ids), kwargs)
        finally:
            emb.weight = nn.Parameter(torch.empty_like(emb.weight, device="meta"), requires_grad=False)
        self.seconds["forward"] += time.perf_counter() - t0

    def layer_type(self, index: int) -> str | None:
        """The kind of decoder block ``index`` (config.layer_types; None where the config has none)."""
        return self.layer_types[index] if index < len(self.layer_types) else None

    def _catch(self, ids: torch.Tensor):
        """The hidden states transformers hands decoder block 0, and the keyword arguments it hands
        the first block of each layer type ({type: kwargs})."""
        firsts: dict[str | None, int] = {}
        for i in range(len(self.layers)):
            firsts.setdefault(self.layer_type(i), i)
        hidden, per_type = None, {}
        for kind, index in firsts.items():
            h, kwargs = self._catch_at(ids, index)
            if hidden is None:
                hidden = h
            elif h.shape != hidden.shape:  # the blocks before it passed through as the model's loop expects
                raise QConvertError(f"{type(self.layers[index]).__name__}: the keyword arguments of its {kind} layers "
                                    "cannot be caught; use --base rtn")
            per_type[kind] = kwargs
        return hidden, per_type

    def _catch_at(self, ids: torch.Tensor, index: int):
        """The hidden states and keyword arguments transformers hands decoder block ``index``, the
        blocks before it passed through (their weights are not loaded: only the kwargs matter)."""
        caught = {}

        class Catcher(nn.Module):
            def forward(self, hidden_states, *args, **kwargs):
                caught["hidden"], caught["args"], caught["kwargs"] = hidden_states, args, kwargs
                raise _Stop

        class PassThrough(nn.Module):
            def forward(self, hidden_states, *args, **kwargs):
                return hidden_states

        saved = [self.layers[i] for i in range(index + 1)]
        for i in range(index):
            self.layers[i] = PassThrough()
        self.layers[index] = Catcher()
        trunk = self.model.get_submodule(DECODER_LAYERS.rsplit(".", 1)[0])
        moved = _buffers_to(trunk, self.device, skip=self.layers)  # the rotary tables, for the embedding pass
        try:
            with torch.no_grad():
                trunk(input_ids=self.on_device(ids), use_cache=False)
        except _Stop:
            pass
        finally:
            for i, layer in enumerate(saved):
                self.layers[i] = layer
            _buffers_back(moved)
        if "kwargs" not in caught:
            raise QConvertError(f"decoder block {index} was not reached by the model's forward; use --base rtn")
        if caught.get("args"):
            raise QConvertError("this architecture passes positional arguments to its decoder blocks; "
                                "calibration does not support it yet: use --base rtn")
        kwargs = {k: v for k, v in caught["kwargs"].items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        return caught["hidden"].float(), kwargs

    def _tensor_name(self, module: nn.Module, attr: str) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return f"{name}.{attr}"
        raise AssertionError("module not in model")

    # ---- one block ----------------------------------------------------------------------
    def load_block(self, index: int) -> nn.Module:
        """Decoder block ``index`` with its real weights (float32)."""
        block = self.layers[index]
        prefix = f"{DECODER_LAYERS}.{index}."
        self.materialize(block, prefix)
        self._block_buffers = _buffers_to(block, self.device)
        self._online_hooks = self._online(block, prefix)
        return block

    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Read ``module``'s parameters from the source (float32, on the walk's device); ``prefix``:
        the module's name in the skeleton, with its trailing dot ("" for the whole model)."""
        for mod_name, mod in module.named_modules():
            for pname, p in list(mod._parameters.items()):
                if p is None:
                    continue
                full = prefix + (f"{mod_name}.{pname}" if mod_name else pname)
                mod._parameters[pname] = nn.Parameter(self._real(self.src.get(self.names[full])), requires_grad=False)

    @staticmethod
    def unload(module: nn.Module) -> None:
        """``module``'s parameters back on the meta device (their memory freed)."""
        for mod in module.modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

    def _online(self, block: nn.Module, prefix: str) -> list:
        """``--rotate hadamard+online``: the run time's transform of down_proj's input, as the first
        pre-hook of the linear, so that its statistics and quantizer see what it will be fed."""
        online = getattr(self.src, "online", None)
        if online is None:
            return []
        from qconvert.online_hadamard import pre_hook

        names = set(self.src.online_modules())
        return [pre_hook(mod, online) for name, mod in block.named_modules() if prefix + name in names]

    def release_block(self, block: nn.Module) -> None:
        for h in self._online_hooks:
            h.remove()
        self._online_hooks = []
        self.unload(block)
        _buffers_back(self._block_buffers)
        self._block_buffers = []

    def block_kwargs(self, rows: int, index: int = 0) -> dict:
        """The keyword arguments transformers hands decoder block ``index`` for ``rows`` samples
        (after ``embed``)."""
        return self._kwargs[rows][self.layer_type(index)]

    def _batches(self, index: int = 0):
        """(slice, kwargs of decoder block ``index``) over the samples, ``self.batch`` at a time."""
        n = self.tokens.shape[0]
        for start in range(0, n, self.batch):
            stop = min(start + self.batch, n)
            yield slice(start, stop), self.block_kwargs(stop - start, index)

    def quantize_block(self, block: nn.Module, targets: dict[str, nn.Linear], solve, prepare=None) -> None:
        """True-sequential calibration of one decoder block, then its output (the next input).

        ``targets``: the block's linears to quantize (full name -> module).  ``solve(groups)``
        quantizes a list of HessianGroup and returns {name: (float weight as run, activation
        quantizer)}.  ``prepare(block, feed)`` may rewrite the block first (``feed()`` yields its
        (input, kwargs) batches).  The block is walked in the order the data flows, each stage
        observed through the stages before it *as quantized* (``_BlockWalk``):

            A  q/k/v (everything in self_attn but o_proj) read ln1(X)
            B  o_proj reads the attention output, recomputed with quantized q/k/v -> Y
            C  h = X + o_proj(Y) -> Y; the MLP's input linears read ln2(h)
            D  the MLP's output linears (down_proj, every expert's w2) read what the
               quantized input linears make of ln2(h)
            E  Y = h + mlp(ln2(h)), all quantized: the next block's input
        (Gemma-2 / 3: o_proj(Y) and mlp(..) through their own norms before they are added:
        ``_block_roles``.)  Attention gets the keyword arguments of this block's layer type.

        With asymmetric calibration (``asym`` > 0, GPTAQ) a float copy of the block runs the same
        stages on the float model's activations, batch by batch, and each observer also sums
        X_floatᵀ X for its linears: the solve then targets the float layer's output
        (``HessianGroup.shift``, ``qconvert.solvers.gptq.asymmetric_target``).
        """
        walk = _BlockWalk(self, block, targets)
        if prepare is not None:  # a method that transforms the whole block first (I-LLM's smoothing)
            def feed():
                for sl, kw in self._batches(walk.index):
                    yield walk.rows(walk.x, sl), kw
            with torch.no_grad(), self._autocast():
                prepare(block, feed)
        if self.float_acts is not None:
            walk.start_float()
        try:
            with torch.no_grad():
                for stage, observe in ((walk.stage_a, True), (walk.stage_b, True), (walk.stage_c, True),
                                       (walk.stage_d, True), (walk.stage_e, False)):
                    obs = walk.timed(stage)
                    if observe and obs is not None:
                        walk.install(solve(obs.groups()))
        finally:
            walk.remove_hooks()
            walk.twin = None
        self.acts.swap()
        if self.float_acts is not None:
            self.float_acts.swap()

    def _autocast(self):
        """bfloat16 matmuls (weights and activations rounded to bf16, float32 accumulation in
        the CPU's bf16 dot products or the GPU's tensor cores); norms, residual sums and the
        buffers stay float32."""
        if self.compute_dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _mlp_cache_for(self, width: int) -> torch.Tensor | None:
        """Memory for down_proj's inputs [n, L, width] between stages D and E, if the budgets
        allow (GPU, then pinned or plain RAM; else None: stage E recomputes gate/up)."""
        n, seqlen = self.tokens.shape
        if self._mlp_cache is None or self._mlp_cache.shape[-1] != width:
            if self._mlp_cache is not None:  # its budget comes back (MoE blocks of another width)
                self.gpu_left, self.ram_left = self._mlp_budgets
            self._mlp_cache, self._mlp_budgets = None, (self.gpu_left, self.ram_left)
            where, self.gpu_left, self.ram_left = placement.place(n * seqlen * width * 4, self.gpu_left, self.ram_left,
                                                                  self.device.type == "cuda", spill="none")
            if where == "none":
                return None
            self._mlp_cache = torch.empty(n, seqlen, width, device=self.device if where == "gpu" else "cpu",
                                          pin_memory=where == "pinned")
        return self._mlp_cache

    def _refill_starved(self, obs: "_Observer", mlp: nn.Module, rerun) -> None:
        """MoE: experts with too few routed tokens are observed again on all tokens."""
        starved = obs.starved_experts(_expert_linears(mlp))
        if starved:
            obs.second_pass = True
            with obs.hooked(), _all_tokens_through(mlp, starved, obs):
                rerun()


class _BlockWalk:
    """One decoder block's calibration walk (``Calibrator.quantize_block``): the stages A..E, each
    returning the observer of the linears it reached (None when it has none to solve)."""

    def __init__(self, cal: "Calibrator", block: nn.Module, targets: dict[str, nn.Linear]):
        self.roles = _block_roles(block)
        parts = [getattr(block, a, None) if a else None for a in self.roles]
        if any(p is None for p, a in zip(parts, self.roles) if a) or getattr(parts[1], "o_proj", None) is None:
            raise QConvertError(f"{type(block).__name__} is not a pre-norm attention + MLP block that calibration "
                                "knows; use --base rtn")
        self.cal, self.targets = cal, targets
        self.index = next((i for i, layer in enumerate(cal.layers) if layer is block), 0)  # its layer type's kwargs
        self.ln1, self.attn, self.ln2, self.mlp, self.attn_out, self.mlp_out = _block_parts(block, self.roles)
        hidden = cal.model.config.hidden_size
        in_attn = {id(m) for m in self.attn.modules()}
        in_mlp = {id(m) for m in self.mlp.modules()}
        o_proj = self.attn.o_proj
        self.a = {n: m for n, m in targets.items() if id(m) in in_attn and m is not o_proj}
        self.b = {n: m for n, m in targets.items() if m is o_proj}
        self.c = {n: m for n, m in targets.items() if id(m) in in_mlp and m.in_features == hidden}
        self.d = {n: m for n, m in targets.items() if id(m) in in_mlp and m.in_features != hidden}
        stray = set(targets) - set(self.a) - set(self.b) - set(self.c) - set(self.d)
        if stray:
            raise QConvertError(f"{sorted(stray)[0]} lies outside attention and MLP; calibration cannot reach it: "
                                f"--exclude it or use --base rtn")
        self.dense_mlp = len(self.d) == 1 and not _expert_linears(self.mlp)
        self.block = block
        self.x, self.y = cal.acts.inputs, cal.acts.outputs
        self.twin = None  # asymmetric calibration: the block in float (start_float)
        self.hooks = []
        self.last_quantized = {}  # q/k/v (gate/up) read one tensor object: quantize it once, not per linear
        self.cache = None

    def start_float(self) -> None:
        """Asymmetric calibration: a float copy of the block as it is now (after the method's
        ``prepare``, before any quantized weight), fed the float model's activations."""
        if not self.dense_mlp:
            raise QConvertError("--asym-calib: a mixture-of-experts block routes the float and the quantized "
                                "tokens differently, so their inputs cannot be paired; quantize without --asym-calib")
        self.twin = copy.deepcopy(self.block)
        self.fx, self.fy = self.cal.float_acts.inputs, self.cal.float_acts.outputs
        local = {id(m): n for n, m in self.block.named_modules()}
        self.twin_of = {name: self.twin.get_submodule(local[id(m)]) for name, m in self.targets.items()}
        self.t_ln1, self.t_attn, self.t_ln2, self.t_mlp, self.t_attn_out, self.t_mlp_out = _block_parts(
            self.twin, self.roles)

    def rows(self, buf: torch.Tensor, sl: slice) -> torch.Tensor:
        """Samples ``sl`` of an activation buffer, on the walk's device (on the CPU, or with the
        buffer on the GPU: a view of it)."""
        return self.cal.on_device(buf[sl])

    # ---- how the quantized block runs between stages
    def quantized_input(self, x, act_quant):
        # holding x keeps its memory from being reused by a later tensor while compared
        last = self.last_quantized
        if not (last.get("x") is x and last["key"] == (x._version, act_quant)):
            last.update(x=x, key=(x._version, act_quant), value=act_quant(x))
        return last["value"]

    def install(self, run_as: dict) -> None:
        for name, (weight, act_quant) in run_as.items():
            lin = self.targets[name]
            lin.weight = nn.Parameter(weight.to(lin.weight.dtype), requires_grad=False)
            self.hooks.append(lin.register_forward_pre_hook(
                lambda m, args, f=act_quant: (self.quantized_input(args[0], f), *args[1:])))

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()

    def timed(self, stage):
        t0 = time.perf_counter()
        with self.cal._autocast():
            result = stage()
        self.last_quantized.clear()
        self.cal.seconds["forward"] += time.perf_counter() - t0
        return result

    def rerun_mlp(self):  # MoE: one more pass over the MLP, for starved experts' statistics
        for sl, _ in self.cal._batches(self.index):
            self.mlp(self.ln2(self.rows(self.y, sl)))

    # ---- the stages
    def stage_a(self):  # q/k/v, fed directly: no forward needed
        if not self.a:
            return None
        obs = _Observer(self.a)
        for sl, _ in self.cal._batches(self.index):
            h0 = self.ln1(self.rows(self.x, sl))
            if self.twin is not None:
                obs.floats = dict.fromkeys(self.a, self.t_ln1(self.rows(self.fx, sl)))
            for m in self.a.values():
                obs._hook(m, (h0,))
        return obs

    def stage_b(self):  # attention output with quantized q/k/v, caught at o_proj
        obs = _Observer(self.b)
        twin_o, fy = (self.t_attn.o_proj, self.fy) if self.twin is not None else (None, None)
        with obs.hooked(), _stop_before(self.attn.o_proj, self.y) as catch, _stop_before(twin_o, fy) as f:
            for sl, kw in self.cal._batches(self.index):
                catch.target = f.target = sl
                if twin_o is not None:  # the float attention output, caught at the float o_proj -> FY
                    with contextlib.suppress(_Stop):
                        self.t_attn(hidden_states=self.t_ln1(self.rows(self.fx, sl)), **kw)
                    obs.floats = dict.fromkeys(self.b, self.rows(self.fy, sl))
                try:
                    self.attn(hidden_states=self.ln1(self.rows(self.x, sl)), **kw)
                except _Stop:
                    pass
                else:
                    raise AssertionError("o_proj was not reached")
        return obs if self.b else None

    def stage_c(self):  # residual after attention into Y; observe the MLP's input linears
        obs = _Observer(self.c)
        with obs.hooked():
            for sl, _ in self.cal._batches(self.index):
                h = self.rows(self.x, sl) + self.attn_out(self.attn.o_proj(self.rows(self.y, sl)))
                self.y[sl] = h
                m = self.ln2(h)
                if self.twin is not None:
                    fh = self.rows(self.fx, sl) + self.t_attn_out(self.t_attn.o_proj(self.rows(self.fy, sl)))
                    self.fy[sl] = fh
                    obs.floats = dict.fromkeys(self.c, self.t_ln2(fh))
                if self.dense_mlp:
                    for lin in self.c.values():
                        obs._hook(lin, (m,))
                else:
                    self.mlp(m)
        if not self.dense_mlp:
            self.cal._refill_starved(obs, self.mlp, self.rerun_mlp)
        return obs if self.c else None

    def stage_d(self):  # the MLP's output linears see the quantized input linears' product
        first = next(iter(self.d.values()))
        self.cache = self.cal._mlp_cache_for(first.in_features) if self.dense_mlp else None
        obs = _Observer(self.d)
        held = {}  # the float down_proj's input of the current batch
        twin_d = self.twin_of[next(iter(self.d))] if self.twin is not None else None
        with obs.hooked(), _stop_before(first if self.dense_mlp else None, self.cache) as catch, \
                _stop_before(twin_d, held) as f:
            for sl, _ in self.cal._batches(self.index):
                catch.target, f.target = sl, "x"
                if twin_d is not None:
                    with contextlib.suppress(_Stop):
                        self.t_mlp(self.t_ln2(self.rows(self.fy, sl)))
                    obs.floats = dict.fromkeys(self.d, held.pop("x"))
                try:
                    self.mlp(self.ln2(self.rows(self.y, sl)))
                except _Stop:
                    pass
        if not self.dense_mlp:
            self.cal._refill_starved(obs, self.mlp, self.rerun_mlp)
        return obs if self.d else None

    def stage_e(self):  # the block's output, as it will run (down_proj's input kept from D if it fit)
        from qconvert.online_hadamard import suspended

        down = next(iter(self.d.values()))
        for sl, _ in self.cal._batches(self.index):
            if self.twin is not None:  # the float block's output: the next block's float input
                fh = self.rows(self.fy, sl)
                self.fy[sl] = fh + self.t_mlp_out(self.t_mlp(self.t_ln2(fh)))
            h = self.rows(self.y, sl)
            if self.cache is not None:
                with suspended(down):  # the cache holds down_proj's input as caught: already transformed
                    self.y[sl] = h + self.mlp_out(down(self.rows(self.cache, sl)))
            else:
                self.y[sl] = h + self.mlp_out(self.mlp(self.ln2(h)))


class _StopCatch:
    target = None


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _block_roles(block: nn.Module) -> tuple:
    """The attribute names of a decoder block's (input norm, attention, the MLP's input norm, MLP,
    the attention output's norm, the MLP output's norm); "" for a norm the block does not have.

    Pre-norm blocks (Llama, Qwen, Mistral, Phi-3, Granite):  h = x + attn(ln1(x));  y = h + mlp(ln2(h)),
    ln2 being ``post_attention_layernorm``.  Gemma-2 / 3 also normalize what attention and the MLP
    add to the stream:  h = x + post_attention_layernorm(attn(ln1(x)));
    y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))).  OLMo-2 normalizes only
    what they add:  h = x + post_attention_layernorm(attn(x));  y = h + post_feedforward_layernorm(mlp(h)).
    (Granite's residual multiplier: ``_block_parts``.)
    """
    if hasattr(block, "post_feedforward_layernorm") and not hasattr(block, "input_layernorm"):
        return ("", "self_attn", "", "mlp", "post_attention_layernorm", "post_feedforward_layernorm")
    if hasattr(block, "pre_feedforward_layernorm") or hasattr(block, "post_feedforward_layernorm"):
        return ("input_layernorm", "self_attn", "pre_feedforward_layernorm", "mlp", "post_attention_layernorm",
                "post_feedforward_layernorm")
    return ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "", "")


def _block_parts(block: nn.Module, roles: tuple) -> list:
    """The block's six parts of ``_block_roles`` as callables (``_identity`` for a role it lacks).
    Granite scales what attention and the MLP add to the stream, y = x + out * m, with
    ``residual_multiplier`` m (a float): its two output parts then multiply by it, as its forward does."""
    parts = [getattr(block, a) if a else _identity for a in roles]
    m = getattr(block, "residual_multiplier", None)
    if m is not None:
        parts[4:] = [functools.partial(_scaled, part, float(m)) for part in parts[4:]]
    return parts


def _scaled(part, m: float, t: torch.Tensor) -> torch.Tensor:
    return part(t) * m


@contextlib.contextmanager
def _stop_before(module: nn.Module | None, store: torch.Tensor | None):
    """A pre-hook on ``module`` that keeps its input in ``store[catch.target]`` and stops the forward."""
    catch = _StopCatch()
    if module is None:
        yield catch
        return

    def hook(mod, args):
        if store is not None:
            store[catch.target] = args[0]
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        yield catch
    finally:
        handle.remove()


class HessianGroup:
    """Linears that read one input: their names and H = 2 XᵀX / rows (float32 [K, K]); with
    asymmetric calibration also ``shift`` = 2 (X_float - X)ᵀ X / rows, X_float the float model's input."""

    def __init__(self, names: list[str], s: torch.Tensor, rows: int, fallback: bool, amax: torch.Tensor | None = None,
                 cross: torch.Tensor | None = None):
        self.names = names
        self.rows = rows
        self.fallback = fallback
        self.shift = cross.sub_(s).mul_(2.0 / rows) if cross is not None and rows else None
        self.hessian = s.mul_(2.0 / rows) if rows else s  # in place: one K x K copy less (the sums are done)
        self.amax = amax  # float32 [K]: max |x| per input channel over the calibration rows


class _Observer:
    """Forward pre-hooks that accumulate XᵀX per group of linears sharing an input."""

    def __init__(self, targets: dict[str, nn.Linear]):
        self.targets = targets
        self.module_name = {id(m): n for n, m in targets.items()}
        self.leader: dict[str, str] = {}  # name -> the name whose accumulator it shares
        self.sums: dict[str, torch.Tensor] = {}
        self.amax: dict[str, torch.Tensor] = {}  # max |x| per input channel (QUIK's outliers)
        self.rows: dict[str, int] = {}
        self.fallback: set[str] = set()
        self.floats: dict[str, torch.Tensor] | None = None  # asymmetric calibration: each linear's float input
        self.cross: dict[str, torch.Tensor] = {}  # ... and Σ x_floatᵀ x per group
        self.second_pass = False  # MoE: a pass that only feeds the starved experts' accumulators
        self.collecting_all = False  # ... while every token runs through them
        self._last = None

    @contextlib.contextmanager
    def hooked(self):
        handles = [m.register_forward_pre_hook(self._hook) for m in self.targets.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._last = None

    def _hook(self, module, args):
        name = self.module_name[id(module)]
        x = args[0]
        key = (x.data_ptr(), tuple(x.shape), x._version)
        # _last holds x itself: while it lives, no other tensor can get its address, so an equal
        # key means the same input (without it, MoE experts that were routed as many tokens
        # could be taken to share one input when the allocator reused the previous one's memory)
        if self.second_pass and not (self.collecting_all and name in self.fallback):
            self._last = (key, name, x)
            return
        if self._last is not None and self._last[0] == key and self._last[1] != name:
            lead = self._last[1]
            if self.leader.setdefault(name, lead) != lead:
                raise AssertionError(f"{name}: inconsistent input sharing")
            return
        self.leader.setdefault(name, name)
        if self.leader[name] != name:
            raise AssertionError(f"{name}: inconsistent input sharing")
        self._last = (key, name, x)
        x2 = x.reshape(-1, x.shape[-1]).float()
        if name not in self.sums:
            self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
            self.amax[name] = torch.zeros(x2.shape[1], device=x2.device)
            self.rows[name] = 0
        with torch.autocast(x2.device.type, enabled=False):  # XᵀX sums in float32 whatever the forward runs in
            self.sums[name].addmm_(x2.T, x2)
            if self.floats is not None:
                xf = self.floats[name].reshape(-1, x2.shape[1]).float()
                if name not in self.cross:
                    self.cross[name] = torch.zeros_like(self.sums[name])
                self.cross[name].addmm_(xf.T, x2)
        torch.maximum(self.amax[name], x2.abs().amax(dim=0), out=self.amax[name])
        self.rows[name] += x2.shape[0]

    def starved_experts(self, experts: set[int]) -> list[str]:
        """Expert linears (``experts``: their ids) whose routed rows are fewer than K."""
        starved = {}
        for name, lin in self.targets.items():
            if id(lin) in experts:
                got = self.rows.get(self.leader.get(name, name), 0)
                if got < lin.in_features:
                    starved[name] = got
        for name, got in starved.items():
            log.warning("%s: the router sent it %d calibration tokens (fewer than its %d inputs); "
                        "its statistics come from all calibration tokens instead", name, got, self.targets[name].in_features)
            self.fallback.add(name)
        for name in starved:
            lead = self.leader.pop(name, None)
            self.sums.pop(lead, None)
            self.amax.pop(lead, None)
            self.rows.pop(lead, None)
        return list(starved)

    def groups(self) -> list[HessianGroup]:
        members: dict[str, list[str]] = {}
        for name in self.targets:  # module order: leaders come first
            if name not in self.leader:
                raise QConvertError(f"calibration never reached {name}; it cannot be quantized with GPTQ: use --base rtn "
                                    f"or --exclude '{name}'")
            members.setdefault(self.leader[name], []).append(name)
        return [HessianGroup(names, self.sums[lead], self.rows[lead], lead in self.fallback, self.amax[lead],
                             self.cross.get(lead)) for lead, names in members.items()]


def _buffers_to(root: nn.Module, device: torch.device, skip: nn.Module | None = None) -> list:
    """Move the real buffers under ``root`` (not under ``skip``) to ``device``; returns what
    ``_buffers_back`` needs to put them back.  The skeleton's rotary tables stay on the CPU
    between uses: only one block at a time is ever on the GPU."""
    if device.type == "cpu":
        return []
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    moved = []
    for mod in root.modules():
        if id(mod) in skipped:
            continue
        for name, buf in list(mod._buffers.items()):
            if buf is not None and not buf.is_meta and buf.device != device:
                moved.append((mod, name, buf))
                mod._buffers[name] = buf.to(device)
    return moved


def _buffers_back(moved: list) -> None:
    for mod, name, buf in moved:
        mod._buffers[name] = buf


def _expert_linears(block: nn.Module) -> set[int]:
    from qconvert.moe import UnfusedExperts

    return {id(m) for mod in block.modules() if isinstance(mod, UnfusedExperts)
            for m in mod.modules() if isinstance(m, nn.Linear)}


@contextlib.contextmanager
def _all_tokens_through(block: nn.Module, starved: list[str], obs: _Observer):
    """During this pass, every token also runs through the starved experts (statistics only)."""
    from qconvert.moe import UnfusedExperts

    handles = []
    for mod_name, mod in block.named_modules():
        if not isinstance(mod, UnfusedExperts):
            continue
        wanted = []
        for e, expert in enumerate(mod.experts):
            if any(obs.module_name.get(id(lin)) in starved for lin in expert.modules()):
                wanted.append(expert)
        if not wanted:
            continue

        def after(module, args, output, wanted=wanted):
            hidden = args[0]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            obs.collecting_all = True
            try:
                for expert in wanted:
                    expert(hidden)
            finally:
                obs.collecting_all = False

        handles.append(mod.register_forward_hook(after))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
