"""Model skeletons: the module tree of a config with parameters on the meta device."""

from __future__ import annotations

import contextlib
import fnmatch

from torch import nn

from qconvert.errors import QConvertError
from qconvert.moe import is_router, unfuse_experts


@contextlib.contextmanager
def meta_parameters():
    """Create parameters on ``meta`` but buffers (rotary tables) for real, on CPU.

    A plain ``torch.device("meta")`` context would also put non-persistent buffers such as
    ``inv_freq`` on meta, and no checkpoint holds them to fill them back in.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        p = module._parameters[name]
        if p is not None and not p.is_meta:  # a tied parameter arrives on meta already: keep it
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(config):
    """The causal-LM module tree of ``config`` with no weight memory, named as its checkpoints
    (fused MoE experts split into one linear per expert projection, ``qconvert.moe``)."""
    from transformers import AutoModelForCausalLM

    with meta_parameters():
        model = AutoModelForCausalLM.from_config(config)
    return unfuse_experts(model).eval()


def model_from_tensors(config, state: dict) -> tuple[nn.Module, list[str], list[str]]:
    """The causal LM of ``config`` holding ``state`` (assigned, not copied), its head tied where
    the config ties it; returns (model, missing, unexpected): the skeleton's parameters ``state``
    lacks (a tied head not among them) and the names it has beyond them."""
    model = build_skeleton(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
    return model, [k for k in missing if not (tied and k == "lm_head.weight")], list(unexpected)


def is_excluded(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def target_linears(model, exclude, must_match=()) -> dict[str, nn.Linear]:
    """Linear modules to quantize, by name, in module order; MoE routers never are.  Each pattern
    of ``must_match`` (the user's --exclude) must match a linear, and some linear must be left: a
    typo would otherwise quantize what it meant to keep, and '*' write an OUT with nothing quantized."""
    linears, routers = {}, []  # MoE routers (a Linear or a module of their own): ignore lists name them
    for n, m in model.named_modules():
        if is_router(n):
            routers.append(n)
        elif isinstance(m, nn.Linear):
            linears[n] = m
    names = list(linears)
    for p in must_match:
        if not any(fnmatch.fnmatchcase(n, p) for n in names + routers):
            examples = ", ".join(dict.fromkeys(n for n in (names[:1] + names[len(names) // 2:][:1] + names[-1:])))
            raise QConvertError(f"--exclude {p!r} matches no linear of this model (full names, such as {examples}; "
                                "'*' matches dots too: '*.down_proj'); nothing was written")
    targets = {n: m for n, m in linears.items() if not is_excluded(n, exclude)}
    if names and not targets:
        raise QConvertError(f"the excludes ({', '.join(repr(p) for p in exclude)}) match all {len(names)} linears of this "
                            "model: nothing is left to quantize; nothing was written")
    return targets


def tied_lm_head(model) -> bool:
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings()
    return head is not None and (head.weight is emb.weight or bool(getattr(model.config, "tie_word_embeddings", False)))
