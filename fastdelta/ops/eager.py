"""When the fused ops skip their custom op's dispatch, and how they still show in a profile.

`torch.library` custom ops are what torch.compile, FakeTensor and tensor subclasses need, but
in eager mode their dispatch costs tens of microseconds a call (measured on the CPU: a LoRA
linear's forward and backward on a [4, 64] input took 290 us through the op against 105 us
eager), which decode-sized inputs and small models feel. So in eager mode on plain tensors
the ops run the same backend functions through a plain autograd.Function instead; one
implementation per backend either way, so the two paths compute the same thing. The cpp
backend goes one step further: its eager path is one C++ op whose autograd node is C++ too
(see `fastdelta.ops.cpp_backend.lora_linear`).
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
from torch.autograd import forward_ad

_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))


def eager_path(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on `tensors` may bypass its custom op: not while torch.compile (or
    export) traces, nor while compiled autograd is on (its backward graph takes the custom op's
    formula, not the eager path's nodes: the cpp backend's C++ nodes cannot be traced), nor
    where the ops run their reference (`runs_reference`), and only
    for plain tensors (not FakeTensor, DTensor or other subclasses, which need the op's fake
    kernel or its dispatch)."""
    if torch.compiler.is_compiling() or _compiled_autograd_enabled() or _transformed():
        return False
    # A loop, not all() over a generator (ruff's SIM110): 0.23 against 0.42 us for six
    # tensors, on every call of every op.
    for tensor in tensors:  # noqa: SIM110
        if type(tensor) not in _PLAIN_TYPES:
            return False
    return True


def runs_reference() -> bool:
    """Whether the ops run their eager reference (`fastdelta.ops.reference`, with the fused
    path's dropout mask) instead of a fused kernel: under forward-mode AD (inside
    `torch.autograd.forward_ad.dual_level()`) or a torch.func transform (grad, vmap, jvp,
    jacrev, ...), never while torch.compile traces (its graph takes the custom ops). The fused
    kernels run below autograd, so they would drop tangents, and they have neither functorch's
    autograd.Function form nor batching rules; the reference is PyTorch ops, which every
    transform handles."""
    return not torch.compiler.is_compiling() and _transformed()


def _transformed() -> bool:
    """Forward-mode AD or a torch.func transform is on: two reads of ~40 ns each."""
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _compiled_autograd_enabled() -> bool:
    """Whether torch._dynamo's compiled autograd is on (a module lookup while it was never
    imported)."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    return module is not None and module.compiled_autograd_enabled


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.autocast casts to on `device`, or None where it is off. It asks first
    whether autocast is on anywhere (a tenth of a microsecond), and only then reads the device's
    type, which alone costs a quarter of a microsecond (torch 2.13)."""
    if not torch._C._is_any_autocast_enabled():
        return None
    device_type = device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_operands(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple:
    """`tensors` in `dtype` (None stays None): an op's operands under torch.autocast."""
    return tuple(None if tensor is None else tensor.to(dtype) for tensor in tensors)


def profiled(name: str) -> contextlib.AbstractContextManager:
    """A profiler range called `name` (the op's name) while torch.profiler records, else
    nothing, so the eager path still shows as fastdelta::... in a trace."""
    if torch.autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(name)
    return contextlib.nullcontext()


def double_backward_message(op: str) -> str:
    """What a double backward through `op`'s fused backward raises (the C++ nodes say the same,
    csrc/autograd.cpp)."""
    return (
        f"fastdelta.ops.{op}: its fused backward has no derivative of its own, so a gradient "
        "taken through it with create_graph=True cannot be differentiated again (a double "
        "backward: gradient penalties, MAML, Hessian-vector products). Take higher derivatives "
        "with torch.func (torch.func.grad of torch.func.grad, jacrev, hessian), under which "
        "fastdelta's ops run their eager reference"
    )


def once_differentiable(op: str):
    """Decorates the backward of `op`'s autograd.Function or custom op. The fused backward
    computes first derivatives only: its kernels run below autograd, so under create_graph=True
    its gradients would have no graph of their own dependence on the inputs, and a second
    differentiation would be silently wrong. Under create_graph the gradients are still the
    fused ones, but each carries a node that raises (with the fix) when a backward reaches it,
    as torch.autograd.function.once_differentiable does. Unlike that one, the node's edges lead
    to the saved tensors as well as to the incoming gradients, so a second backward towards a
    weight reaches it instead of leaving these gradients out. The saved tensors must include
    every input the gradients depend on."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            return _refuse_double_backward(op, outputs, (*grads, *ctx.saved_tensors))

        return wrapper

    return decorate


def _refuse_double_backward(op: str, outputs: tuple, depends_on: tuple) -> tuple:
    """`outputs` with each tensor an alias whose grad_fn raises, its edges to `depends_on`."""
    positions = [i for i, output in enumerate(outputs) if isinstance(output, torch.Tensor)]
    edges = [t for t in depends_on if isinstance(t, torch.Tensor) and t.requires_grad]
    if not positions or not edges:
        return outputs
    error = torch._C._functions.DelayedError(
        double_backward_message(op).encode(), len(positions) + len(edges)
    )
    guarded = error(*(outputs[i].detach() for i in positions), *edges)[: len(positions)]
    result = list(outputs)
    for i, tensor in zip(positions, guarded, strict=True):
        result[i] = tensor
    return tuple(result)
