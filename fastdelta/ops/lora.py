"""`fastdelta::lora_linear`: the LoRA linear as a torch.library custom op.

One op, one autograd formula, one fake kernel; the backend (triton, cpp or torch) is chosen
when the op runs, by `fastdelta.ops.backend`. The forward also returns xa = dropout(x) A^T
([..., r], float32, or float64 for float64 x), which the backward needs; with x and the
dropout seed it is all the op saves, so nothing of size [M, N] and no second copy of x is kept
for backward (the parameters W, A and B are saved by reference).

Outside torch.compile, `lora_linear_eager` runs the same backend functions with the same
saved tensors through a plain autograd.Function: the custom op's dispatch costs tens of
microseconds a call, which small (decode-sized) inputs would feel; see `fastdelta.ops.eager`.

The backend is an argument, resolved once by the functional `fastdelta.ops.lora_linear` and
given to the backward as well, so a set_backend() between a forward and its backward cannot
split them over two backends (whose dropout masks differ). `fastdelta.ops.verification` may
move a variant off it (a kernel that failed its first-use check): the forward decides, and the
backward follows the forward's route.
"""

import torch
from torch import Tensor

from fastdelta.ops import verification
from fastdelta.ops.backend import backend_module, op_gradients
from fastdelta.ops.eager import once_differentiable, profiled


def xa_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of xa: float32 (float64 for float64 inputs), whatever x's dtype."""
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("fastdelta::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    seed: Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(y, xa) with y = x W^T + b + scaling * xa B^T and xa = dropout(x) A^T, computed by
    `backend` ("triton", "cpp" or "torch"; `fastdelta.ops.resolve_backend` names it).

    Dropout is on when `seed` (an int64 scalar tensor on x's device) is given: the mask is
    drawn from it, so the same seed gives the same mask, in the forward and the backward.
    """
    name = verification.lora_backend(
        backend, x, weight, bias is not None, lora_A, seed, fan_in_fan_out
    )
    return backend_module(name).lora_forward(
        x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out
    )


@lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out, backend):
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    y = x.new_empty((*x.shape[:-1], out_features))
    xa = x.new_empty((*x.shape[:-1], lora_A.shape[0]), dtype=xa_dtype(x.dtype))
    return y, xa


@torch.library.custom_op("fastdelta::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    seed: Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
    has_bias: bool,
    backend: str,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    need_lora_A: bool,
    need_lora_B: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, weight, bias, lora_A, lora_B); an empty tensor for each not needed.
    `backend` and `has_bias` are the forward's: with them the backward finds the forward's
    route (see `fastdelta.ops.verification`)."""
    name = verification.lora_backend(
        backend, x, weight, has_bias, lora_A, seed, fan_in_fan_out, check=False
    )
    needs = (need_x, need_weight, need_bias, need_lora_A, need_lora_B)
    grads = backend_module(name).lora_backward(
        grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, fan_in_fan_out, needs
    )
    return op_gradients(grads, grad_y)


@lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, fan_in_fan_out, *rest):
    need_x, need_weight, need_bias, need_lora_A, need_lora_B = rest[2:]
    out_features = grad_y.shape[-1]

    def grad(needed, like, shape=None):
        if not needed:
            return grad_y.new_empty(0)
        return like.new_empty(like.shape if shape is None else shape)

    return (
        grad(need_x, x),
        grad(need_weight, weight),
        grad(need_bias, grad_y, (out_features,)),
        grad(need_lora_A, lora_A),
        grad(need_lora_B, lora_B),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out, backend = inputs
    xa = output[1]
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.arguments = (scaling, dropout_p, fan_in_fan_out, bias is not None, backend)


@once_differentiable("lora_linear")
def _backward(ctx, grad_y, _grad_xa):
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    grads = lora_linear_backward_op(
        grad_y, x, weight, lora_A, lora_B, xa, seed, *ctx.arguments, *needs
    )
    # No gradients for seed, scaling, dropout_p, fan_in_fan_out and backend.
    return *(g if needed else None for g, needed in zip(grads, needs, strict=True)), *[None] * 5


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _LoraLinearFunction(torch.autograd.Function):
    """The op's forward and backward as an autograd.Function, for eager mode."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out, name
    ):
        # `name` is the routed backend (see lora_linear_eager); the backward runs the same one.
        ctx.backend = backend_module(name)
        y, xa = ctx.backend.lora_forward(
            x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out
        )
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
        ctx.arguments = (scaling, dropout_p, fan_in_fan_out)
        return y

    @staticmethod
    @once_differentiable("lora_linear")
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        with profiled("fastdelta::lora_linear_backward"):
            grads = ctx.backend.lora_backward(
                grad_y, x, weight, lora_A, lora_B, xa, seed, *ctx.arguments, needs
            )
        return *grads, None, None, None, None, None


def lora_linear_eager(
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out, backend
) -> Tensor:
    """y of `lora_linear_op`, computed by the same backend without the custom op's dispatch;
    with no gradient needed it saves nothing."""
    name = verification.lora_backend(
        backend, x, weight, bias is not None, lora_A, seed, fan_in_fan_out
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B)
    )
    arguments = (x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out)
    with profiled("fastdelta::lora_linear"):
        if needs_grad:
            return _LoraLinearFunction.apply(*arguments, name)
        return backend_module(name).lora_forward(*arguments)[0]
