"""Functional delta ops, dispatched to the chosen backend.

Every delta layer computes through these functions; nothing else in the library does the math.
"""

from __future__ import annotations

import torch

from fastdelta.ops import reference
from fastdelta.ops.backend import get_backend, resolve_backend, set_backend

# Backend name -> implementation of each op; the backend module decides which name runs.
_LORA_LINEAR = {"torch": reference.lora_linear}
_ADAPTER_BOTTLENECK = {"torch": reference.adapter_bottleneck}


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """A linear layer with a LoRA delta: x W^T + b + scaling * (dropout(x) A^T) B^T.

    See `fastdelta.ops.reference.lora_linear` for the shapes.
    """
    implementation = _LORA_LINEAR[resolve_backend(x.device)]
    return implementation(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)


def adapter_bottleneck(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scaling: float,
    activation: str,
    residual: torch.Tensor,
) -> torch.Tensor:
    """An adapter bottleneck added to a residual: residual + scaling * (act(h D^T + b_d) U^T + b_u).

    See `fastdelta.ops.reference.adapter_bottleneck` for the shapes.
    """
    implementation = _ADAPTER_BOTTLENECK[resolve_backend(h.device)]
    return implementation(
        h, down_weight, down_bias, up_weight, up_bias, scaling, activation, residual
    )


__all__ = ["adapter_bottleneck", "get_backend", "lora_linear", "resolve_backend", "set_backend"]
