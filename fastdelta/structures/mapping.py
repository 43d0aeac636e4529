"""Rewriting a model's module names into common-structure names.

A map is a nested dict keyed by dotted paths of the model's own names, relative to the key
above it. A value is
- a string: the common name of that module (dotted for more than one segment, as in
  "attn.layer_norm"; "|" between alternatives, as in "q|k|v" for GPT-2's fused projection);
- a tuple `(common name, children map)`;
- a dict: the children of a module whose own segment is kept unchanged (used for "$", which
  stands for any layer index).
Each mapped segment gets a trailing "@" and layer indices stay numbers, so BERT's
`encoder.layer.0.attention.self.query` becomes `encoder@.block@.0.attn@.q@`. Modules on no path
of the map (`attention.self`, dropout layers) have no common name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import product

from torch import nn

INDEX = "$"
MARK = "@"


@dataclass(frozen=True)
class StructureMap:
    """The common-structure map of one architecture.

    `base` is relative to the base model (`BertModel`: `encoder.layer...`), `heads` to the model
    with a head (`BertForMaskedLM`: `cls.predictions...`).
    """

    base: Mapping
    heads: Mapping = field(default_factory=dict)


class UnsupportedArchitectureError(ValueError):
    pass


def map_name(name: str, tree: Mapping) -> tuple[str, ...]:
    """Common names of the dotted `name` under `tree`; empty when the name is not mapped."""
    if not name:
        return ()
    return tuple(".".join(segments) for segments in _map_segments(name.split("."), tree))


def _map_segments(segments: list[str], tree: Mapping) -> list[list[str]]:
    for key, value in tree.items():
        consumed = _consumed(key, segments)
        if consumed is None:
            continue
        rest = segments[consumed:]
        heads = _emitted(key, segments[:consumed], value)
        if not rest:
            return heads
        if isinstance(value, tuple):
            children = value[1]
        elif isinstance(value, dict):
            children = value
        else:
            continue
        tails = _map_segments(rest, children)
        if tails:
            return [head + tail for head, tail in product(heads, tails)]
    return []


def _consumed(key: str, segments: list[str]) -> int | None:
    if key == INDEX:
        return 1 if segments[0].isdigit() else None
    key_segments = key.split(".")
    return len(key_segments) if segments[: len(key_segments)] == key_segments else None


def _emitted(key: str, consumed: list[str], value) -> list[list[str]]:
    if isinstance(value, dict):
        return [consumed]
    common = value[0] if isinstance(value, tuple) else value
    return [
        [segment + MARK for segment in alternative.split(".")] for alternative in common.split("|")
    ]


def structure_names(model: nn.Module, structure: StructureMap) -> dict[str, tuple[str, ...]]:
    """Common names of every mapped module of `model`."""
    prefix = getattr(model, "base_model_prefix", "")
    has_base_child = bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)
    names = {}
    for name, _ in model.named_modules():
        if has_base_child and (name == prefix or name.startswith(prefix + ".")):
            mapped = map_name(name[len(prefix) + 1 :], structure.base)
        else:
            mapped = map_name(name, structure.heads)
            if not mapped and not has_base_child:
                mapped = map_name(name, structure.base)
        if mapped:
            names[name] = mapped
    return names
