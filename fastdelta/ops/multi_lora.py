"""`fastdelta::multi_lora_linear`: many LoRAs on one frozen base, one adapter per row.

    y[i] = x[i] W^T + b + scalings[j] * (drop(x[i]) A[j]^T) B[j]^T,  j = the adapter of row i

lora_A [n, r, K] and lora_B [n, N, r] stack the n adapters (a lower rank zero-padded to r);
row i's adapter is given by segments, computed once per batch from the adapter ids
(`fastdelta.ops.multi_lora_functional.adapter_segments`): `order` [M] lists the rows sorted by
adapter (the rows of no adapter last) and `starts` [n + 1] where each adapter's rows begin in
it. The base GEMM runs once over the whole batch; the low-rank products run per segment.

Built as `fastdelta.ops.lora` is: one op, one autograd formula, one fake kernel, the backend an
argument resolved once by the functional and handed to the backward, and `multi_lora_eager`
running the same backend functions through a plain autograd.Function outside torch.compile. The
forward also returns xa = drop(x) A[j]^T per row ([..., r], float32, float64 for float64 x;
zero for rows of no adapter), which the backward needs. Saved for the backward: x, xa, the
scalings, the segments and the seed (W, A and B by reference), nothing of size [M, N]. The
scalings are constants of the op: no gradient reaches them.
The dropout mask is the LoRA op's for x's shape and the same seed, so row i is dropped exactly
as `lora_linear` on the whole batch would drop it.
"""

import torch
from torch import Tensor

from fastdelta.ops import verification
from fastdelta.ops.backend import backend_module, op_gradients
from fastdelta.ops.eager import once_differentiable, profiled
from fastdelta.ops.lora import xa_dtype
from fastdelta.ops.variants import multi_lora_variant


def route(requested, x, weight, has_bias, lora_A, seed, fan_in_fan_out, check=True) -> str:
    """The backend that runs this call: `requested`, or where first-use verification moved its
    variant (`fastdelta.ops.verification`). A backward passes check=False: it follows its
    forward."""
    if requested == "torch" or not verification.may_route(x.device):
        return requested
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if m == 0:
        return requested
    n = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    adapters, rank = lora_A.shape[:2]
    variant = multi_lora_variant(
        x.device, x.dtype, has_bias, seed is not None, fan_in_fan_out, n, k, rank, adapters, m
    )
    return verification.route(requested, variant, check)


@torch.library.custom_op("fastdelta::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scalings: Tensor,
    order: Tensor,
    starts: Tensor,
    seed: Tensor | None,
    dropout_p: float,
    fan_in_fan_out: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(y, xa) of the mixed batch (see the module docstring), computed by `backend`. scalings:
    [n], xa's dtype; order: [M] and starts: [n + 1], int64; seed: an int64 scalar tensor, or
    None for no dropout."""
    name = route(backend, x, weight, bias is not None, lora_A, seed, fan_in_fan_out)
    return backend_module(name).multi_lora_forward(
        x, weight, bias, lora_A, lora_B, scalings, order, starts, seed, dropout_p, fan_in_fan_out
    )


@multi_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scalings, order, starts, seed, dropout_p, *rest):
    y = x.new_empty((*x.shape[:-1], lora_B.shape[1]))
    xa = x.new_empty((*x.shape[:-1], lora_A.shape[1]), dtype=xa_dtype(x.dtype))
    return y, xa


@torch.library.custom_op("fastdelta::multi_lora_linear_backward", mutates_args=())
def multi_lora_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scalings: Tensor,
    order: Tensor,
    starts: Tensor,
    xa: Tensor,
    seed: Tensor | None,
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
    `backend` and `has_bias` are the forward's, so the backward finds the forward's route."""
    name = route(backend, x, weight, has_bias, lora_A, seed, fan_in_fan_out, check=False)
    needs = (need_x, need_weight, need_bias, need_lora_A, need_lora_B)
    grads = backend_module(name).multi_lora_backward(
        grad_y, x, weight, lora_A, lora_B, scalings, order, starts, xa, seed, dropout_p,
        fan_in_fan_out, needs,
    )  # fmt: skip
    return op_gradients(grads, grad_y)


@multi_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, *rest):
    needs = rest[-5:]
    likes = (x, weight, grad_y.new_empty(grad_y.shape[-1]), lora_A, lora_B)
    return tuple(
        torch.empty_like(like) if needed else grad_y.new_empty(0)
        for like, needed in zip(likes, needs, strict=True)
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, order, starts, seed = inputs[:9]
    dropout_p, fan_in_fan_out, backend = inputs[9:]
    xa = output[1]
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, weight, lora_A, lora_B, scalings, order, starts, xa, seed)
    ctx.arguments = (dropout_p, fan_in_fan_out, bias is not None, backend)


@once_differentiable("multi_lora_linear")
def _backward(ctx, grad_y, _grad_xa):
    needs = ctx.needs_input_grad[:5]
    grads = multi_lora_linear_backward_op(grad_y, *ctx.saved_tensors, *ctx.arguments, *needs)
    # No gradients for the scalings (constants), the segments, the seed and the flags.
    return *(g if needed else None for g, needed in zip(grads, needs, strict=True)), *[None] * 7


multi_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _MultiLoraLinearFunction(torch.autograd.Function):
    """The op's forward and backward as an autograd.Function, for eager mode."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_A, lora_B, scalings, order, starts, seed, dropout_p,
        fan_in_fan_out, name,
    ):  # fmt: skip
        # `name` is the routed backend (see multi_lora_eager); the backward runs the same one.
        ctx.backend = backend_module(name)
        y, xa = ctx.backend.multi_lora_forward(
            x, weight, bias, lora_A, lora_B, scalings, order, starts, seed, dropout_p,
            fan_in_fan_out,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, lora_A, lora_B, scalings, order, starts, xa, seed)
        ctx.arguments = (dropout_p, fan_in_fan_out)
        return y

    @staticmethod
    @once_differentiable("multi_lora_linear")
    def backward(ctx, grad_y):
        needs = ctx.needs_input_grad[:5]
        with profiled("fastdelta::multi_lora_linear_backward"):
            grads = ctx.backend.multi_lora_backward(
                grad_y, *ctx.saved_tensors, *ctx.arguments, needs
            )
        return *grads, *[None] * 7


def multi_lora_eager(
    x, weight, bias, lora_A, lora_B, scalings, order, starts, seed, dropout_p, fan_in_fan_out,
    backend,
) -> Tensor:  # fmt: skip
    """y of `multi_lora_linear_op`, computed by the same backend without the custom op's
    dispatch; with no gradient needed it saves nothing."""
    name = route(backend, x, weight, bias is not None, lora_A, seed, fan_in_fan_out)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B)
    )
    arguments = (
        x, weight, bias, lora_A, lora_B, scalings, order, starts, seed, dropout_p, fan_in_fan_out,
    )  # fmt: skip
    with profiled("fastdelta::multi_lora_linear"):
        if needs_grad:
            return _MultiLoraLinearFunction.apply(*arguments, name)
        return backend_module(name).multi_lora_forward(*arguments)[0]
