"""The adapter activations, by the names OpenDelta and transformers use."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
ALIASES = {"swish": "silu", "gelu_tanh": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}


def canonical_activation(name: str) -> str:
    """The canonical name of an activation (`swish` -> `silu`); raises on an unknown one."""
    if not isinstance(name, str):
        raise TypeError(f"non_linearity must be a string, got {type(name).__name__}")
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        known = sorted({*ACTIVATIONS, *ALIASES})
        raise ValueError(f"Unknown non_linearity {name!r}; choose one of {', '.join(known)}")
    return key
