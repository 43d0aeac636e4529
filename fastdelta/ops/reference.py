"""Eager PyTorch versions of the fused ops: the CPU path and the oracle every fast path is
tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdelta.ops.activations import ACTIVATIONS


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, differentiated by autograd.

    x: [..., K]; weight: [N, K], or [K, N] with `fan_in_fan_out` (GPT-2's Conv1D);
    bias: [N] or None; lora_A: [r, K]; lora_B: [N, r]. Returns [..., N]. Dropout uses
    `keep_mask` (bool, x's shape) when given, so a fast path's mask can be checked exactly.
    """
    base_weight = weight.t() if fan_in_fan_out else weight
    y = F.linear(x, base_weight, bias)
    if dropout_p == 0:
        dropped = x
    elif keep_mask is None:
        dropped = F.dropout(x, dropout_p, training=True)
    else:
        dropped = x * keep_mask / (1 - dropout_p)
    # Scaling the [..., r] intermediate costs r/N of scaling the output. (Not add(alpha=):
    # inductor in torch 2.13 on the CPU drops alpha when adding a matmul result to 2-D input.)
    return y + F.linear(F.linear(dropped, lora_A) * scaling, lora_B)


def adapter_bottleneck(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scaling: float,
    activation: str,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = residual + scaling * (act(h D^T + b_d) U^T + b_u), differentiated by autograd.

    h: [..., d_in]; down_weight: [m, d_in]; up_weight: [d_out, m]; residual: [..., d_out], or
    None for h (a sequential adapter).
    """
    residual = h if residual is None else residual
    bottleneck = ACTIVATIONS[activation](F.linear(h, down_weight, down_bias))
    if scaling == 1.0:
        return residual + F.linear(bottleneck, up_weight, up_bias)
    # Scale the [..., m] bottleneck, not the output (see lora_linear on add's alpha).
    scaled_bias = None if up_bias is None else up_bias * scaling
    return residual + F.linear(bottleneck * scaling, up_weight, scaled_bias)
