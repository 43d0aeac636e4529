"""`fastdelta::dora_linear`: DoRA's linear as a torch.library custom op.

    y = k * z + b,  z = x W^T + s drop(x) A^T B^T,  k = magnitude / norm (per output feature)

Built as `fastdelta.ops.lora` is: one op, one autograd formula, one fake kernel, the backend
(triton, cpp or torch) an argument resolved once by the functional `fastdelta.ops.dora_linear`
and handed to the backward, and `dora_linear_eager` running the same backend functions through a
plain autograd.Function outside torch.compile. Dropout is on the low-rank path only (the DoRA
paper's efficient form, one base GEMM), its mask drawn from the seed exactly as the LoRA op
draws it.

The norm (||W + s B A|| of each row, float32, float64 for float64 x) is an argument: the DoRA
layer keeps ||W||^2 between steps (`row_norms_squared`) and adds the low-rank terms
(`weight_norm`), which no op could keep. It is a constant of the backward (the DoRA paper's
section 4.3, and PEFT's), unless `exact_norm`: then the backward adds the gradient through the
norm to A, B (and W), without forming W + s B A (`fastdelta.ops.dora_composed`).

Saved for the backward: what the LoRA op saves (x, xa, the seed; W, A and B by reference), the
magnitude and the norm ([N]), and z ([M, N], x's dtype) only when the magnitude (or, with
exact_norm, the norm) needs a gradient (`keep_z`): as much memory again as the output.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdelta.ops import verification
from fastdelta.ops.backend import backend_module, op_gradients
from fastdelta.ops.eager import once_differentiable, profiled
from fastdelta.ops.lora import xa_dtype


def row_norms_squared(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """||W_j||^2 of each output row j of the base weight ([N, K], or [K, N] with
    fan_in_fan_out), [N], in float32 (float64 for a float64 weight)."""
    precise = weight.float() if weight.dtype != torch.float64 else weight
    return precise.square().sum(0 if fan_in_fan_out else 1)


def weight_norm(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    base_squared: Tensor | None = None,
) -> Tensor:
    """||W + s B A|| of each output row, [N], without forming the [N, K] sum:
    ||W||^2 + 2 s <W A^T, B> + s^2 <B (A A^T), B>, each <., .> a row-wise dot product, in
    float32 (float64 for a float64 weight). `base_squared`: ||W||^2 (row_norms_squared) when the
    caller kept it; the rest reads W once, for W A^T in W's dtype. Differentiable (autograd)
    where grad mode is on; run it under torch.no_grad() for the usual constant norm."""
    if base_squared is None:
        base_squared = row_norms_squared(weight, fan_in_fan_out)
    precise = base_squared.dtype
    base = weight.t() if fan_in_fan_out else weight
    cross = F.linear(base, lora_A.to(base.dtype)).to(precise)  # W A^T, [N, r]
    lora_A, lora_B = lora_A.to(precise), lora_B.to(precise)
    squared = base_squared + (2 * scaling) * (cross * lora_B).sum(1)
    squared = squared + (scaling * scaling) * ((lora_B @ (lora_A @ lora_A.t())) * lora_B).sum(1)
    return squared.clamp_min(0).sqrt()


def _route(
    backend, x, weight, has_bias, lora_A, seed, fan_in_fan_out, keep_z, exact_norm, check=True
):
    """The backend that runs this call (`fastdelta.ops.verification`; a backward, check=False,
    follows its forward's route)."""
    return verification.dora_backend(
        backend, x, weight, has_bias, lora_A, seed, fan_in_fan_out, keep_z, exact_norm, check
    )


@torch.library.custom_op("fastdelta::dora_linear", mutates_args=())
def dora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    seed: Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
    exact_norm: bool,
    keep_z: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xa, z): y = k * z + b with k = magnitude / norm and z = x W^T + scaling * xa B^T,
    xa = dropout(x) A^T (float32, float64 for float64 x), by `backend`. z is returned (x's
    dtype) when `keep_z`, else an empty tensor. magnitude and norm: [N], in xa's dtype."""
    name = _route(
        backend, x, weight, bias is not None, lora_A, seed, fan_in_fan_out, keep_z, exact_norm
    )
    y, xa, z = backend_module(name).dora_forward(
        x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p,
        fan_in_fan_out, keep_z,
    )  # fmt: skip
    return y, xa, x.new_empty(0) if z is None else z


@dora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, seed, *rest):
    keep_z = rest[-2]
    y = x.new_empty((*x.shape[:-1], lora_B.shape[0]))
    xa = x.new_empty((*x.shape[:-1], lora_A.shape[0]), dtype=xa_dtype(x.dtype))
    return y, xa, torch.empty_like(y) if keep_z else x.new_empty(0)


@torch.library.custom_op("fastdelta::dora_linear_backward", mutates_args=())
def dora_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    xa: Tensor,
    z: Tensor | None,
    seed: Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
    exact_norm: bool,
    has_bias: bool,
    backend: str,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    need_lora_A: bool,
    need_lora_B: bool,
    need_magnitude: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, weight, bias, lora_A, lora_B, magnitude); an empty tensor for each not
    needed. z: the forward's, None where it was not kept."""
    keep_z = z is not None
    name = _route(
        backend, x, weight, has_bias, lora_A, seed, fan_in_fan_out, keep_z, exact_norm, False
    )
    needs = (need_x, need_weight, need_bias, need_lora_A, need_lora_B, need_magnitude)
    grads = backend_module(name).dora_backward(
        grad_y, x, weight, lora_A, lora_B, magnitude, norm, xa, z, seed, scaling, dropout_p,
        fan_in_fan_out, exact_norm, needs,
    )  # fmt: skip
    return op_gradients(grads, grad_y)


@dora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, magnitude, norm, xa, z, seed, *rest):
    needs = rest[-6:]
    likes = (x, weight, grad_y.new_empty(grad_y.shape[-1]), lora_A, lora_B, magnitude)
    return tuple(
        torch.empty_like(like) if needed else grad_y.new_empty(0)
        for like, needed in zip(likes, needs, strict=True)
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, norm, seed = inputs[:8]
    scaling, dropout_p, fan_in_fan_out, exact_norm, keep_z, backend = inputs[8:]
    _, xa, z = output
    ctx.mark_non_differentiable(xa, z)
    ctx.save_for_backward(
        x, weight, lora_A, lora_B, magnitude, norm, xa, z if keep_z else None, seed
    )
    ctx.arguments = (scaling, dropout_p, fan_in_fan_out, exact_norm, bias is not None, backend)


@once_differentiable("dora_linear")
def _backward(ctx, grad_y, _grad_xa, _grad_z):
    needs = ctx.needs_input_grad[:6]
    grads = dora_linear_backward_op(grad_y, *ctx.saved_tensors, *ctx.arguments, *needs)
    # No gradients for the norm (a constant, see the module docstring) and the other arguments.
    return *(g if needed else None for g, needed in zip(grads, needs, strict=True)), *[None] * 8


dora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _DoraLinearFunction(torch.autograd.Function):
    """The op's forward and backward as an autograd.Function, for eager mode."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p,
        fan_in_fan_out, exact_norm, keep_z, name,
    ):  # fmt: skip
        # `name` is the routed backend (see dora_linear_eager); the backward runs the same one.
        ctx.backend = backend_module(name)
        y, xa, z = ctx.backend.dora_forward(
            x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p,
            fan_in_fan_out, keep_z,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, norm, xa, z, seed)
        ctx.arguments = (scaling, dropout_p, fan_in_fan_out, exact_norm)
        return y

    @staticmethod
    @once_differentiable("dora_linear")
    def backward(ctx, grad_y):
        needs = ctx.needs_input_grad[:6]
        with profiled("fastdelta::dora_linear_backward"):
            grads = ctx.backend.dora_backward(grad_y, *ctx.saved_tensors, *ctx.arguments, needs)
        return *grads, *[None] * 8


def dora_linear_eager(
    x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p, fan_in_fan_out,
    exact_norm, keep_z, backend,
) -> Tensor:  # fmt: skip
    """y of `dora_linear_op`, computed by the same backend without the custom op's dispatch;
    with no gradient needed it saves nothing."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B, magnitude)
    )
    keep_z = keep_z and needs_grad
    name = _route(
        backend, x, weight, bias is not None, lora_A, seed, fan_in_fan_out, keep_z, exact_norm
    )
    arguments = (
        x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p,
        fan_in_fan_out,
    )  # fmt: skip
    with profiled("fastdelta::dora_linear"):
        if needs_grad:
            return _DoraLinearFunction.apply(*arguments, exact_norm, keep_z, name)
        return backend_module(name).dora_forward(*arguments, False)[0]
