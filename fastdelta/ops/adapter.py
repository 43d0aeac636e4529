"""`fastdelta::adapter_bottleneck`: the adapter bottleneck as a torch.library custom op.

out = residual + scaling * (act(h D^T + b_d) U^T + b_u), where residual None stands for h (a
sequential adapter; then dh includes the residual path in the same kernel). The forward also
returns the pre-activation h D^T + b_d ([..., m], float32, or float64 for float64 h); with h
it is all the op saves for backward, which recomputes the activation from it.

Outside torch.compile, `adapter_bottleneck_eager` runs the same backend functions with the
same saved tensors through a plain autograd.Function; see `fastdelta.ops.eager`.

As for `fastdelta::lora_linear`, the backend is an argument, resolved once by the functional
`fastdelta.ops.adapter_bottleneck`, and the backward follows the forward's route (see
`fastdelta.ops.verification`).
"""

import torch
from torch import Tensor

from fastdelta.ops import verification
from fastdelta.ops.backend import backend_module, op_gradients
from fastdelta.ops.eager import once_differentiable, profiled


def pre_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved pre-activation: float32 (float64 for float64 inputs)."""
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("fastdelta::adapter_bottleneck", mutates_args=())
def adapter_bottleneck_op(
    h: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    residual: Tensor | None,
    scaling: float,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out, pre-activation) of the adapter bottleneck, computed by `backend`; see the module
    docstring."""
    name = verification.adapter_backend(
        backend, h, down_weight, up_weight, down_bias is not None, up_bias is not None,
        activation, residual is None,
    )  # fmt: skip
    return backend_module(name).adapter_forward(
        h, down_weight, down_bias, up_weight, up_bias, residual, scaling, activation
    )


@adapter_bottleneck_op.register_fake
def _(h, down_weight, down_bias, up_weight, up_bias, residual, scaling, activation, backend):
    out = h.new_empty((*h.shape[:-1], up_weight.shape[0]))
    pre = h.new_empty((*h.shape[:-1], down_weight.shape[0]), dtype=pre_dtype(h.dtype))
    return out, pre


@torch.library.custom_op("fastdelta::adapter_bottleneck_backward", mutates_args=())
def adapter_bottleneck_backward_op(
    grad_out: Tensor,
    h: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    pre: Tensor,
    scaling: float,
    activation: str,
    sequential: bool,
    has_down_bias: bool,
    has_up_bias: bool,
    backend: str,
    need_h: bool,
    need_down_weight: bool,
    need_down_bias: bool,
    need_up_weight: bool,
    need_up_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (h, down_weight, down_bias, up_weight, up_bias); empty where not needed.
    `backend` and the has_*_bias flags are the forward's: with them the backward finds the
    forward's route."""
    name = verification.adapter_backend(
        backend, h, down_weight, up_weight, has_down_bias, has_up_bias, activation, sequential,
        check=False,
    )  # fmt: skip
    needs = (need_h, need_down_weight, need_down_bias, need_up_weight, need_up_bias)
    grads = backend_module(name).adapter_backward(
        grad_out, h, down_weight, up_weight, pre, scaling, activation, sequential, needs
    )
    return op_gradients(grads, grad_out)


@adapter_bottleneck_backward_op.register_fake
def _(grad_out, h, down_weight, up_weight, pre, scaling, activation, sequential, *rest):
    likes = (h, down_weight, down_weight[:, 0], up_weight, up_weight[:, 0])
    return tuple(
        like.new_empty(like.shape) if needed else grad_out.new_empty(0)
        for like, needed in zip(likes, rest[3:], strict=True)
    )


def _setup_context(ctx, inputs, output):
    h, down_weight, down_bias, up_weight, up_bias, residual, scaling, activation, backend = inputs
    pre = output[1]
    ctx.mark_non_differentiable(pre)
    # down_bias (a reference) for once_differentiable: the gradients depend on it through pre.
    ctx.save_for_backward(h, down_weight, up_weight, pre, down_bias)
    biases = (down_bias is not None, up_bias is not None)
    ctx.arguments = (scaling, activation, residual is None, *biases, backend)


@once_differentiable("adapter_bottleneck")
def _backward(ctx, grad_out, _grad_pre):
    h, down_weight, up_weight, pre, _ = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    grads = adapter_bottleneck_backward_op(
        grad_out, h, down_weight, up_weight, pre, *ctx.arguments, *needs
    )
    grads = (g if needed else None for g, needed in zip(grads, needs, strict=True))
    # A parallel adapter's residual receives grad_out unchanged; no gradients for the rest.
    grad_residual = grad_out if ctx.needs_input_grad[5] else None
    return *grads, grad_residual, None, None, None


adapter_bottleneck_op.register_autograd(_backward, setup_context=_setup_context)


class _AdapterBottleneckFunction(torch.autograd.Function):
    """The op's forward and backward as an autograd.Function, for eager mode."""

    @staticmethod
    def forward(
        ctx, h, down_weight, down_bias, up_weight, up_bias, residual, scaling, activation, name
    ):
        # `name` is the routed backend (see adapter_bottleneck_eager); the backward runs it too.
        ctx.backend = backend_module(name)
        out, pre = ctx.backend.adapter_forward(
            h, down_weight, down_bias, up_weight, up_bias, residual, scaling, activation
        )
        ctx.save_for_backward(h, down_weight, up_weight, pre, down_bias)
        ctx.arguments = (scaling, activation, residual is None)
        return out

    @staticmethod
    @once_differentiable("adapter_bottleneck")
    def backward(ctx, grad_out):
        h, down_weight, up_weight, pre, _ = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        with profiled("fastdelta::adapter_bottleneck_backward"):
            grads = ctx.backend.adapter_backward(
                grad_out, h, down_weight, up_weight, pre, *ctx.arguments, needs
            )
        grad_residual = grad_out if ctx.needs_input_grad[5] else None
        return *grads, grad_residual, None, None, None


def adapter_bottleneck_eager(
    h, down_weight, down_bias, up_weight, up_bias, residual, scaling, activation, backend
) -> Tensor:
    """out of `adapter_bottleneck_op`, computed by the same backend without the custom op's
    dispatch; with no gradient needed it saves nothing."""
    name = verification.adapter_backend(
        backend, h, down_weight, up_weight, down_bias is not None, up_bias is not None,
        activation, residual is None,
    )  # fmt: skip
    tensors = (h, down_weight, down_bias, up_weight, up_bias, residual)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    with profiled("fastdelta::adapter_bottleneck"):
        if needs_grad:
            return _AdapterBottleneckFunction.apply(*tensors, scaling, activation, name)
        return backend_module(name).adapter_forward(*tensors, scaling, activation)[0]
