"""A backward with create_graph=True through the fused ops, and a second backward after it.

The fused backwards compute first derivatives below autograd, so the gradients they return have
no graph of their own; differentiated again they once gave silently wrong results (the torch
backend's LoRA and adapter, the cpp backend's adapter) or an unrelated error (the cpp
backend's LoRA). Now a create_graph backward returns the same first derivatives, and a second
backward that reaches them raises and names torch.func, whose nested transforms run the eager
reference and give the higher derivatives, checked here against the reference in float64.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from fastdelta import ops
from fastdelta.ops import multi_lora_functional, reference
from fastdelta.ops.backend import backend_module

F64 = torch.float64
BACKENDS = ("torch", "cpp", "triton")
DTYPES = {"torch": F64, "cpp": F64, "triton": torch.float32}  # Triton has no float64
REFUSAL = "create_graph=True.*torch.func"


def leaf(*shape, seed, positive=False, dtype=F64):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return (tensor.abs() + 1 if positive else tensor).requires_grad_()


def seed():
    return torch.tensor(11)


def lora(x, weight, bias, lora_A, lora_B):
    return ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.3, seed=seed())


def dora(x, weight, lora_A, lora_B, magnitude):
    return ops.dora_linear(x, weight, None, lora_A, lora_B, magnitude, 1.5, 0.3, seed=seed())


def multi_lora(x, weight, lora_A, lora_B):
    ids = torch.tensor([0, 1, -1, 0])
    scalings = torch.tensor([1.5, 0.5], dtype=x.dtype)
    return ops.multi_lora_linear(x, weight, None, lora_A, lora_B, scalings, ids, 0.3, seed=seed())


def adapter(x, down_weight, down_bias, up_weight, up_bias):
    return ops.adapter_bottleneck(x, down_weight, down_bias, up_weight, up_bias, 0.5, "gelu")


def linear_adapter(x, weight, bias, down_weight, down_bias, up_weight, up_bias):
    adapter_weights = (down_weight, down_bias, up_weight, up_bias)
    return ops.linear_adapter(x, weight, bias, *adapter_weights, 0.5, "silu")


def inputs(name, dtype=F64):
    """(op, its differentiable inputs as leaves that require grad)."""
    make = functools.partial(leaf, dtype=dtype)
    x = make(4, 8, seed=0)
    low_rank = [make(3, 8, seed=3), make(6, 3, seed=4)]
    if name == "lora":
        return lora, [x, make(6, 8, seed=1), make(6, seed=2), *low_rank]
    if name == "dora":
        return dora, [x, make(6, 8, seed=1), *low_rank, make(6, seed=5, positive=True)]
    if name == "multi_lora":
        return multi_lora, [x, make(6, 8, seed=1), make(2, 3, 8, seed=3), make(2, 6, 3, seed=4)]
    adapter_weights = [make(3, 8, seed=6), make(3, seed=7), make(8, 3, seed=8), make(8, seed=9)]
    if name == "adapter":
        return adapter, [x, *adapter_weights]
    return linear_adapter, [x, make(8, 8, seed=1), make(8, seed=2), *adapter_weights]


NAMES = ("lora", "dora", "multi_lora", "adapter", "linear_adapter")
# Inputs no first derivative depends on (an output bias): a second backward towards them may
# pass by the op's gradients, which contribute nothing there.
INDEPENDENT = {"lora": {2}, "adapter": {4}, "linear_adapter": {6}}


@pytest.fixture(params=["eager", "custom op"])
def path(request, monkeypatch):
    """The eager path (autograd.Function, or the cpp backend's C++ node), or the custom ops."""
    if request.param == "custom op":
        monkeypatch.setattr(ops, "eager_path", lambda *tensors: False)
        monkeypatch.setattr(multi_lora_functional, "eager_path", lambda *tensors: False)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_create_graph_gives_the_same_first_derivatives(use_backend, backend, name, path):
    use_backend(backend)
    op, tensors = inputs(name, DTYPES[backend])
    grad_out = torch.randn(4, 8 if "adapter" in name else 6, dtype=DTYPES[backend])
    plain = torch.autograd.grad(op(*tensors), tensors, grad_out)
    built = torch.autograd.grad(op(*tensors), tensors, grad_out, create_graph=True)
    for first, second in zip(plain, built, strict=True):
        torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_a_second_backward_raises_instead_of_dropping_terms(use_backend, backend, name, path):
    use_backend(backend)
    op, tensors = inputs(name, DTYPES[backend])
    # grad_out of a sum has no graph: only the saved tensors lead the second backward to the op.
    gradients = torch.autograd.grad(op(*tensors).sum(), tensors, create_graph=True)
    penalty = sum(gradient.pow(2).sum() for gradient in gradients)
    for i, tensor in enumerate(tensors):
        # Another path to the tensor must not hide the penalty's terms.
        try:
            (second,) = torch.autograd.grad(penalty + tensor.sum(), [tensor], retain_graph=True)
        except RuntimeError as error:
            assert re.search(REFUSAL, str(error)), error
            continue
        # Only where the first derivatives do not depend on the tensor is the answer exact.
        assert i in INDEPENDENT.get(name, ()), f"input {i}: the penalty's terms were dropped"
        torch.testing.assert_close(second, torch.ones_like(tensor), rtol=0, atol=0)
    # grad_out with a graph of its own (the loss is not linear in the output).
    gradients = torch.autograd.grad(op(*tensors).pow(2).sum(), tensors[:1], create_graph=True)
    with pytest.raises(RuntimeError, match=REFUSAL):
        gradients[0].pow(2).sum().backward()


@pytest.mark.parametrize("backend", ("torch", "cpp"))
@pytest.mark.parametrize("name", ("lora", "adapter"))
def test_torch_func_gives_the_higher_derivatives(use_backend, backend, name):
    """The fix the refusal names: nested torch.func transforms run the eager reference."""
    use_backend(backend)
    op, tensors = inputs(name)
    tensors = [tensor.detach() for tensor in tensors]
    if name == "lora":
        mask = backend_module(backend).dropout_keep_mask(seed(), (4, 8), 0.3)

        def eager(x, weight, bias, lora_A, lora_B):
            return reference.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.3, keep_mask=mask)
    else:

        def eager(x, *weights):
            return reference.adapter_bottleneck(x, *weights, 0.5, "gelu")

    def penalty(function):
        def of_weights(*weights):
            def loss(x):
                return function(x, *weights).pow(2).sum()

            return torch.func.grad(loss)(tensors[0]).pow(2).sum()

        return torch.func.grad(of_weights, argnums=tuple(range(len(tensors) - 1)))

    fused, expected = penalty(op)(*tensors[1:]), penalty(eager)(*tensors[1:])
    for fused_gradient, expected_gradient in zip(fused, expected, strict=True):
        torch.testing.assert_close(fused_gradient, expected_gradient)
