"""DoRA around a backend's LoRA op: the column scale, the bias and the gradient through the norm.

    y = k * z + b,  z = x W^T + s drop(x) A^T B^T,  k = magnitude / norm (per output feature)

A backend's LoRA forward and backward compute z and its gradients; these functions put the
column scale around them, in ATen. The torch and cpp backends compose their LoRA ops this way
(dora_forward_using, dora_backward_using with scale_grad); the triton backend scales in its
forward kernel's epilogue and has its own scale_grad kernel, and shares dora_backward_using.

What the backward keeps: x, xa and the seed as the LoRA op does, the parameters by reference,
and z ([M, N] in x's dtype) when the magnitude (or, with exact_norm, the norm) needs a
gradient: dm = the column sums of dY * z / norm. (Without z they would need dY^T x, an [N, K]
product over the M rows: the cost of the forward's GEMM again.)
"""

from __future__ import annotations

import torch


def _base_weight(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight as nn.Linear holds it, [N, K]."""
    return weight.t() if fan_in_fan_out else weight


def column_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """k = magnitude / norm, [N], in the norm's dtype (float32, float64 for float64 x)."""
    return magnitude.to(norm.dtype) / norm


def scale_columns(
    z: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, keep_z: bool
) -> torch.Tensor:
    """y = z * k + b in z's dtype (k rounded to it, as the eager DoRA layer does); in place over
    z unless `keep_z` (the backward then needs z)."""
    k = k.to(z.dtype)
    if keep_z:
        return z * k if bias is None else torch.addcmul(bias, z, k)
    z.mul_(k)
    return z if bias is None else z.add_(bias)


def dora_forward_using(
    lora_forward, x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p,
    fan_in_fan_out, keep_z,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(y, xa, z or None): `lora_forward` (a backend's) computes z without bias, ATen scales its
    columns and adds the bias."""
    z, xa = lora_forward(x, weight, None, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out)
    y = scale_columns(z, column_scale(magnitude, norm), bias, keep_z)
    return y, xa, z if keep_z else None


def scale_grad(
    grad2d: torch.Tensor, z2d: torch.Tensor | None, k: torch.Tensor, need_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dZ = dY * k, the column sums of dY * z or None, the column sums of dY or None); the
    sums in k's dtype. 2-D inputs; z2d None when its sums are not needed."""
    grad_z = grad2d * k.to(grad2d.dtype)
    dots = None if z2d is None else (grad2d * z2d).sum(0, dtype=k.dtype)
    sums = grad2d.sum(0, dtype=k.dtype) if need_bias else None
    return grad_z, dots, sums


def dora_norm_grads(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    k: torch.Tensor,
    norm: torch.Tensor,
    grad_magnitude: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """The gradient through the norm (exact_norm) to (weight, lora_A, lora_B), None where not
    needed, in the norm's dtype, without forming V = W + s B A unless W's own gradient is asked
    for (it is [N, K] anyway).

    dL/dnorm_j = c_j = -k_j dL/dm_j; with d = c / norm, dL/dV = diag(d) V, so
    dB = s diag(d) (W A^T + s B (A A^T)), dA = s (B^T diag(d)) W + s^2 (B^T diag(d) B) A and
    dW = diag(d) (W + s B A). The products with W run in W's dtype: two reads of W."""
    need_weight, need_A, need_B = needs
    d = -(k * grad_magnitude) / norm
    precise = norm.dtype
    base = _base_weight(weight, fan_in_fan_out)  # [N, K]
    lora_A_precise, lora_B_precise = lora_A.to(precise), lora_B.to(precise)
    grad_weight = grad_A = grad_B = None
    if need_B:
        cross = torch.nn.functional.linear(base, lora_A.to(base.dtype)).to(precise)  # W A^T
        gram = lora_A_precise @ lora_A_precise.t()
        grad_B = (cross + scaling * (lora_B_precise @ gram)) * (scaling * d[:, None])
    if need_A:
        scaled_b = lora_B_precise * d[:, None]  # diag(d) B
        grad_A = (scaling * (scaled_b.t().to(base.dtype) @ base)).to(precise)
        grad_A += (scaling * scaling) * ((scaled_b.t() @ lora_B_precise) @ lora_A_precise)
    if need_weight:
        combined = base.to(precise) + scaling * (lora_B_precise @ lora_A_precise)
        grad_weight = combined * d[:, None]
        grad_weight = grad_weight.t() if fan_in_fan_out else grad_weight
    return grad_weight, grad_A, grad_B


def _add(grad: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
    """grad + extra in grad's dtype (grad is None where not needed, and then so is extra)."""
    if extra is None:
        return grad
    return (grad.to(extra.dtype) + extra).to(grad.dtype)


def dora_backward_using(
    lora_backward, scale_grad, grad_y, x, weight, lora_A, lora_B, magnitude, norm, xa, z, seed,
    scaling, dropout_p, fan_in_fan_out, exact_norm, needs,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Gradients of (x, weight, bias, lora_A, lora_B, magnitude), None where not needed, from a
    backend's `lora_backward` and `scale_grad` (see this module's): dZ = dY * k once, the LoRA
    backward of dZ, db = the column sums of dY, dm = the column sums of dY * z / norm, and with
    `exact_norm` the gradient through the norm (dora_norm_grads)."""
    need_x, need_weight, need_bias, need_A, need_B, need_magnitude = needs
    through_norm = exact_norm and (need_weight or need_A or need_B)
    if (need_magnitude or through_norm) and z is None:
        raise RuntimeError(
            "fastdelta::dora_linear: the magnitude's gradient (or the norm's, exact_norm) needs "
            "z, which the forward did not keep: run the forward with keep_z=True"
        )
    k = column_scale(magnitude, norm)
    grad2d = grad_y.reshape(-1, grad_y.shape[-1])
    z2d = z.reshape(grad2d.shape) if need_magnitude or through_norm else None
    grad_z, dots, sums = scale_grad(grad2d, z2d, k, need_bias)
    lora_needs = (need_x, need_weight, False, need_A, need_B)
    grad_x, grad_weight, _, grad_A, grad_B = lora_backward(
        grad_z, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, fan_in_fan_out, lora_needs
    )
    grad_bias = None if sums is None else sums.to(grad_y.dtype)
    grad_magnitude = None if dots is None else dots / norm
    if through_norm:
        extra = dora_norm_grads(
            weight, lora_A, lora_B, scaling, fan_in_fan_out, k, norm, grad_magnitude,
            (need_weight, need_A, need_B),
        )  # fmt: skip
        grad_weight, grad_A, grad_B = (
            _add(grad, more)
            for grad, more in zip((grad_weight, grad_A, grad_B), extra, strict=True)
        )
    if not need_magnitude:
        grad_magnitude = None
    return grad_x, grad_weight, grad_bias, grad_A, grad_B, grad_magnitude
