"""Prefix tuning's way into transformers' attention, without patching a class.

transformers (5.x) models compute attention through one call,
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)(
module, query, key, value, attention_mask, **kwargs)`, with `module` the attention module and
key/value [batch, key_value_heads, keys, head_dim]. This module registers, through transformers'
own `AttentionInterface` and `AttentionMaskInterface`, one attention implementation per supported
original ("fastdelta_prefix_sdpa", "fastdelta_prefix_eager"): it prepends the prefix of the
calling module (found in the module's `__dict__`, put there while its delta is attached) to key
and value, widens the mask and T5's position bias over the prefix positions, and calls the
original implementation (sdpa, or the model's own eager function); modules without a prefix
(cross-attention, layers not modified) go straight to the original. Masks are created as the
original creates them. Routing a model sets its attention modules' `config._attn_implementation`
to the prefix implementation while a prefix is attached, and back when the last is detached, so
a detached model computes exactly what it did.

Every query attends every prefix position, also in causal attention: the prefix stands before
the sequence. The prefix carries no position: its keys are used as learned (no rotary embedding),
and T5's relative position bias is zero over it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fastdelta.pseudo_input import run_pseudo_forward

# Where an attention module keeps the prefix delta it prepends (or a probe, while one runs).
PREFIX_KEY = "_fastdelta_prefix"
ROUTED = "fastdelta_prefix_"
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")
_EAGER_FUNCTIONS: dict[type, Callable] = {}


def routed_name(original: str) -> str:
    return ROUTED + original


def original_implementation(config) -> str:
    """The attention implementation `config` names, or the one it named before it was routed.
    None (a config no model set up) is transformers' eager default."""
    name = config._attn_implementation or "eager"
    return name.removeprefix(ROUTED) if isinstance(name, str) else name


def _with_prefix_columns(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """`mask` ([..., queries, keys], bool or additive) with `length` columns in front that let
    every query attend (True, or 0 added to the score)."""
    if mask is None:
        return None
    columns = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    return torch.cat([columns((*mask.shape[:-1], length)), mask], dim=-1)


def _original_function(module: nn.Module, original: str) -> Callable:
    if original == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    cls = type(module)
    if cls not in _EAGER_FUNCTIONS:
        _EAGER_FUNCTIONS[cls] = vars(sys.modules[cls.__module__])["eager_attention_forward"]
    return _EAGER_FUNCTIONS[cls]


def _prefix_attention(original: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        compute = _original_function(module, original)
        prefix = module.__dict__.get(PREFIX_KEY)
        if prefix is None:
            return compute(module, query, key, value, attention_mask, **kwargs)
        if isinstance(prefix, AttentionProbe):
            prefix.record(key)
            return compute(module, query, key, value, attention_mask, **kwargs)
        prefix_key, prefix_value = prefix.prefix_states(key.shape[0], key.dtype)
        length, queries, keys = prefix_key.shape[2], query.shape[2], key.shape[2]
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if attention_mask is None and original == "sdpa" and causal and queries > 1:
            # sdpa would mask causally itself (is_causal, aligned top-left), but over the
            # prefix too: the same mask is written out, the prefix columns in front of it.
            positions = torch.arange(max(queries, keys), device=key.device)
            attention_mask = (positions[None, :keys] <= positions[:queries, None])[None, None]
        attention_mask = _with_prefix_columns(attention_mask, length)
        if kwargs.get("position_bias") is not None:
            kwargs["position_bias"] = _with_prefix_columns(kwargs["position_bias"], length)
        key = torch.cat([prefix_key, key], dim=2)
        value = torch.cat([prefix_value, value], dim=2)
        return compute(module, query, key, value, attention_mask, **kwargs)

    return attention


for _original in SUPPORTED_IMPLEMENTATIONS:
    AttentionInterface.register(routed_name(_original), _prefix_attention(_original))
    AttentionMaskInterface.register(routed_name(_original), ALL_MASK_ATTENTION_FUNCTIONS[_original])


class AttentionProbe:
    """Put in an attention module's `__dict__` during a pseudo forward: records the shape of the
    keys it computes attention with, (key_value_heads, head_dim)."""

    def __init__(self):
        self.shape: tuple[int, int] | None = None

    def record(self, key: torch.Tensor) -> None:
        self.shape = (key.shape[1], key.shape[-1])


def attention_config(module: nn.Module):
    """The transformers config of `module` that picks its attention implementation, or None."""
    config = getattr(module, "config", None)
    return config if hasattr(config, "_attn_implementation") else None


def check_routable(module: nn.Module, name: str) -> None:
    """Refuse, naming the fix, an attention module whose implementation prefix tuning cannot
    run through."""
    original = original_implementation(module.config)
    if original not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"{name} computes attention with {original!r}; prefix tuning runs through "
            f"{' or '.join(map(repr, SUPPORTED_IMPLEMENTATIONS))}: call "
            "model.set_attn_implementation('sdpa') before building the PrefixModel"
        )
    cls = type(module)
    if original == "eager" and "eager_attention_forward" not in vars(sys.modules[cls.__module__]):
        raise ValueError(
            f"{name} ({cls.__name__}) uses eager attention, but {cls.__module__} defines no "
            "eager_attention_forward for the prefix to run through: call "
            "model.set_attn_implementation('sdpa') before building the PrefixModel"
        )
    if original == "eager" and getattr(module, "reorder_and_upcast_attn", False):
        raise ValueError(
            f"{name} has reorder_and_upcast_attn=True, whose eager attention does not go "
            "through transformers' attention interface: set config.reorder_and_upcast_attn = "
            "False, or model.set_attn_implementation('sdpa'), before building the PrefixModel"
        )


def set_routing(config, routed: bool) -> None:
    """Point `config` at the prefix implementation of its attention (routed) or back."""
    original = original_implementation(config)
    config._attn_implementation = routed_name(original) if routed else original


def route_attention(backbone: nn.Module, prefixes: list[tuple[nn.Module, nn.Module | None]]):
    """Give each attention module of `prefixes` its prefix delta (None takes it away), and
    route each config those modules use while any module of `backbone` using it has a prefix."""
    for module, prefix in prefixes:
        if prefix is None:
            module.__dict__.pop(PREFIX_KEY, None)
        else:
            module.__dict__[PREFIX_KEY] = prefix
    in_use = {id(module.config) for module in backbone.modules() if PREFIX_KEY in module.__dict__}
    configs = {id(module.config): module.config for module, _ in prefixes}
    for identity, config in configs.items():
        set_routing(config, identity in in_use)


def find_attention(backbone: nn.Module, targets: list[str]) -> dict[str, list[tuple]]:
    """{target: [(name, key_value_heads, head_dim), ...]}: the modules inside each target (the
    target included) that compute attention through transformers' attention interface, seen in
    one pseudo forward of `backbone` with every such candidate probed, and the shape of their
    keys. The backbone is left as it was."""
    candidates = {
        name: module
        for target in targets
        for name, module in backbone.get_submodule(target).named_modules(prefix=target)
        if attention_config(module) is not None
    }
    for name, module in candidates.items():
        check_routable(module, name)
        if PREFIX_KEY in module.__dict__:
            raise ValueError(
                f"{name} already has a prefix of another PrefixModel: detach that one first, "
                "or exclude its modules (exclude_modules)"
            )
    probes = {name: AttentionProbe() for name in candidates}
    configs = {id(module.config): module.config for module in candidates.values()}
    implementations = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for name, module in candidates.items():
            module.__dict__[PREFIX_KEY] = probes[name]
        for config in configs.values():
            set_routing(config, True)
        run_pseudo_forward(
            backbone,
            targets,
            f"finds the attention inside {', '.join(targets)}",
            "name the attention modules in modified_modules",
        )
    finally:
        for module in candidates.values():
            module.__dict__.pop(PREFIX_KEY, None)
        for identity, config in configs.items():
            config._attn_implementation = implementations[identity]
    return {
        target: [
            (name, *probe.shape)
            for name, probe in probes.items()
            if probe.shape is not None and (name == target or name.startswith(target + "."))
        ]
        for target in targets
    }


class RoutingCheck:
    """A forward pre-hook on the backbone that refuses to run when an attention module holding
    a prefix no longer routes through the prefix implementation (its implementation was
    switched after the PrefixModel was built), which would drop the prefix silently.
    `names` are the attention modules' names in the backbone."""

    def __init__(self, names: list[str]):
        self.names = names

    def __call__(self, backbone: nn.Module, args) -> None:
        for name in self.names:
            module = backbone.get_submodule(name)
            implementation = module.config._attn_implementation
            if PREFIX_KEY in module.__dict__ and not str(implementation).startswith(ROUTED):
                raise RuntimeError(
                    f"{name} holds a prefix, but its attention implementation was switched to "
                    f"{implementation!r} after the PrefixModel was built, which would drop the "
                    "prefix: delta_model.detach(), switch the implementation, then "
                    "delta_model.attach()"
                )
