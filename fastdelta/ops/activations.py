"""The adapter activations, by the names OpenDelta and transformers use."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_TANH_C = math.sqrt(2 / math.pi)
_TANH_K = 0.044715


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z * _SQRT_HALF)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _gelu_tanh_grad(z: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(_TANH_C * (z + _TANH_K * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _TANH_C * (1 + 3 * _TANH_K * z * z)


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


# d act / dz, for the hand-written backward of the torch backend.
ACTIVATION_GRADS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": lambda z: (z > 0).to(z.dtype),
    "gelu": _gelu_grad,
    "gelu_new": _gelu_tanh_grad,
    "silu": _silu_grad,
}
ALIASES = {"swish": "silu", "gelu_tanh": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}


def canonical_activation(name: str) -> str:
    """The canonical name of an activation (`swish` -> `silu`); raises on an unknown one."""
    if name in ACTIVATIONS:  # the ops' every call: one lookup (a canonical name stays itself)
        return name
    if not isinstance(name, str):
        raise TypeError(f"non_linearity must be a string, got {type(name).__name__}")
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        known = sorted({*ACTIVATIONS, *ALIASES})
        raise ValueError(f"Unknown non_linearity {name!r}; choose one of {', '.join(known)}")
    return key
