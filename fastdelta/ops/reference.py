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


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    keep_mask: torch.Tensor | None = None,
    exact_norm: bool = False,
) -> torch.Tensor:
    """DoRA with dropout on the low-rank path, forming V = W + scaling * B A:
    y = m / ||V||_row * (x W^T + scaling * (dropout(x) A^T) B^T) + b, differentiated by
    autograd; the norm is a constant of the backward unless `exact_norm`. magnitude: [N];
    the rest as in lora_linear."""
    base_weight = weight.t() if fan_in_fan_out else weight
    norm = torch.linalg.vector_norm(base_weight + scaling * (lora_B @ lora_A), dim=1)
    if not exact_norm:
        norm = norm.detach()
    z = lora_linear(x, weight, None, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out, keep_mask)
    y = z * (magnitude / norm).to(z.dtype)
    return y if bias is None else y + bias


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A LoRA per row, each adapter's rows run separately, differentiated by autograd:
    y[i] = x[i] W^T + b + scalings[j] (dropout(x[i]) A[j]^T) B[j]^T, j = adapter_ids[i] (-1:
    none). lora_A: [n, r, K]; lora_B: [n, N, r]; scalings: [n]; adapter_ids: one per row of x;
    keep_mask as in lora_linear (x's shape)."""
    k = x.shape[-1]
    ids = adapter_ids.reshape(-1)
    x2d = x.reshape(-1, k)
    mask = None if keep_mask is None else keep_mask.reshape(-1, k)
    base_weight = weight.t() if fan_in_fan_out else weight
    y = F.linear(x2d, base_weight, bias)
    for j in range(lora_A.shape[0]):
        rows = (ids == j).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        x_j = x2d[rows]
        if dropout_p == 0:
            dropped = x_j
        elif mask is None:
            dropped = F.dropout(x_j, dropout_p, training=True)
        else:
            dropped = x_j * mask[rows] / (1 - dropout_p)
        low_rank = F.linear(F.linear(dropped, lora_A[j]) * scalings[j].to(x.dtype), lora_B[j])
        y = y.index_add(0, rows, low_rank)
    return y.view(*x.shape[:-1], y.shape[-1])


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
