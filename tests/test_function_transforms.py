"""Forward-mode AD (`torch.autograd.forward_ad`, `torch.func.jvp`) and torch.func transforms
(grad, vmap: per-sample gradients) through the ops and layers.

The fused kernels run below autograd, so no tangent would come out of them, and they have
neither functorch's autograd.Function form nor batching rules; under a dual level or a
transform the ops run their eager reference with the fused path's dropout mask instead.
Checked here in float64: the primal equals the fused op's output for the same seed, the tangent
a central finite difference of the fused op, and per-sample gradients from vmap(grad) the
fused path's autograd gradients sample by sample.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, vmap

import fastdelta
from fastdelta import ops

F64 = torch.float64
BACKENDS = ("torch", "cpp")


def rand(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def lora_call(x, lora_A):
    weight, bias, lora_B = rand(6, 8, seed=1), rand(6, seed=2), rand(6, 3, seed=3)
    return ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.3, seed=torch.tensor(11))


def dora_call(x, lora_A):
    weight, bias, lora_B = rand(6, 8, seed=1), rand(6, seed=2), rand(6, 3, seed=3)
    magnitude = rand(6, seed=4).abs() + 1
    # The exact norm: the derivative a finite difference measures (by default the norm is a
    # constant of the derivative, as in the DoRA paper).
    seed = torch.tensor(11)
    out = ops.dora_linear(
        x, weight, None, lora_A, lora_B, magnitude, 1.5, 0.3, seed=seed, exact_norm=True
    )
    return out + bias


def adapter_call(x, down_weight):
    up = (rand(8, 3, seed=5), rand(8, seed=6))
    return ops.adapter_bottleneck(x, down_weight, rand(3, seed=7), *up, 0.5, "gelu")


def linear_adapter_call(x, down_weight):
    weight = rand(8, 8, seed=8)
    up = (rand(8, 3, seed=5), rand(8, seed=6))
    return ops.linear_adapter(x, weight, None, down_weight, rand(3, seed=7), *up, 0.5, "silu")


def multi_lora_call(x, lora_A):
    stacked_A = torch.stack([lora_A, lora_A.flip(0)])
    stacked_B = torch.stack([rand(6, 3, seed=3), rand(6, 3, seed=9)])
    ids = torch.tensor([0, 1, -1, 0])
    return ops.multi_lora_linear(
        x, rand(6, 8, seed=1), None, stacked_A, stacked_B, torch.tensor([1.5, 0.5]), ids, 0.3,
        seed=torch.tensor(11),
    )  # fmt: skip


CALLS = {
    "lora": (lora_call, (3, 8)),
    "dora": (dora_call, (3, 8)),
    "adapter": (adapter_call, (3, 8)),
    "linear_adapter": (linear_adapter_call, (3, 8)),
    "multi_lora": (multi_lora_call, (3, 8)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_ops_carry_tangents(use_backend, backend, name):
    use_backend(backend)
    call, _ = CALLS[name]
    x, tangent_x = rand(4, 8, seed=20), rand(4, 8, seed=21)
    weight = rand(3, 8, seed=22)
    tangent_w = rand(3, 8, seed=23)
    with fwAD.dual_level():
        out = call(fwAD.make_dual(x, tangent_x), fwAD.make_dual(weight, tangent_w))
        primal, tangent = fwAD.unpack_dual(out)
    assert tangent is not None, "the tangent was dropped"
    torch.testing.assert_close(primal, call(x, weight))
    eps = 1e-6
    difference = (
        call(x + eps * tangent_x, weight + eps * tangent_w)
        - call(x - eps * tangent_x, weight - eps * tangent_w)
    ) / (2 * eps)
    torch.testing.assert_close(tangent, difference, rtol=1e-6, atol=1e-6)


def delta_model(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5)).to(dtype)
    if kind in ("lora", "dora"):
        fastdelta.LoraModel(model, modified_modules=["0", "2"], lora_r=2, use_dora=kind == "dora")
        for module in model.modules():
            if hasattr(module, "lora_B"):
                nn.init.normal_(module.lora_B)
    else:
        fastdelta.AdapterModel(model, modified_modules=["0"], bottleneck_dim=3)
        nn.init.normal_(model[0].adapter.up_weight)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_torch_func_jvp_through_a_delta_model(use_backend, backend, kind):
    use_backend(backend)
    model = delta_model(kind, F64).eval()
    x, tangent = rand(4, 8, seed=30), rand(4, 8, seed=31)
    output, output_tangent = torch.func.jvp(model, (x,), (tangent,))
    torch.testing.assert_close(output, model(x))
    eps = 1e-6
    difference = (model(x + eps * tangent) - model(x - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(output_tangent, difference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", (*BACKENDS, "triton"))
@pytest.mark.parametrize("kind", ["lora", "dora", "adapter"])
def test_per_sample_gradients_with_vmap_of_grad(use_backend, backend, kind):
    use_backend(backend)
    dtype = torch.float32 if backend == "triton" else F64  # Triton's kernels take no float64
    model = delta_model(kind, dtype)
    parameters = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    x = rand(5, 8, seed=40).to(dtype)

    def loss(values, sample):
        return functional_call(model, values, (sample.unsqueeze(0),)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(parameters, x)
    # float32 (triton) compares the reference against the fused kernels: their sums' order.
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    for index in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        model(x[index : index + 1]).square().sum().backward()
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                torch.testing.assert_close(per_sample[name][index], parameter.grad, **tolerance)
