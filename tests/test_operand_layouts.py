"""Every operand of the fused ops is read through its own strides, with 64-bit offsets.

Two kinds of layout bug give wrong numbers without any error, so each has a test of its own:
- a kernel that assumes a vector (a bias) is contiguous reads the wrong elements of a sliced or
  expanded one (`bias[::2]`, `b.expand(n)`): checked on every backend against the reference;
- a kernel that multiplies an int32 index by a stride wraps once index x stride passes 2^31 (a
  tensor of 2^31 elements, such as a [256000, 8192] weight). Such a tensor does not fit in a
  test, but the product can be made to pass 2^31 over a tiny storage: a dimension of size 1 may
  have any stride, and the kernels compute the offsets of the masked-off lanes past it too.
  Triton's interpreter, with its debug option on, checks every int32 multiplication and add for
  overflow (`sanitize_overflow`), masked lanes included; so every operand of every op is run
  with a stride of 2^30 on a size-1 dimension, and a kernel that computes an offset in int32
  raises there.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastdelta import ops
from fastdelta.ops import reference

BACKENDS = ("torch", "triton", "cpp")
# A stride that fits int32 but whose product with a lane index >= 2 does not.
HUGE_STRIDE = 2**30


def vector_view(kind: str, base: torch.Tensor, length: int) -> torch.Tensor:
    """A [length] view of `base` that is not contiguous: every other element, or one element
    expanded (stride 0)."""
    return base[::2] if kind == "sliced" else base.expand(length)


def vector_base(kind: str, length: int, generator: torch.Generator) -> torch.Tensor:
    size = 2 * length if kind == "sliced" else 1
    return torch.randn(size, generator=generator, dtype=torch.float64)


def leaves(tensors: dict, dtype: torch.dtype) -> dict:
    return {name: tensor.to(dtype).clone().requires_grad_() for name, tensor in tensors.items()}


def assert_close(got: dict, expected: dict) -> None:
    for name, tensor in expected.items():
        assert got[name] is not None, f"{name}: no gradient"
        torch.testing.assert_close(
            got[name].double(),
            tensor,
            rtol=1e-4,
            atol=1e-4,
            msg=lambda text, name=name: f"{name}: {text}",
        )


@pytest.mark.parametrize("kind", ["sliced", "expanded"])
@pytest.mark.parametrize("name", BACKENDS)
def test_lora_reads_a_strided_bias(use_backend, name, kind):
    use_backend(name)
    generator = torch.Generator().manual_seed(0)
    n, k, r = 37, 20, 4
    tensors = {
        "x": torch.randn(9, k, generator=generator, dtype=torch.float64),
        "weight": torch.randn(n, k, generator=generator, dtype=torch.float64) / k**0.5,
        "bias": vector_base(kind, n, generator),
        "lora_A": torch.randn(r, k, generator=generator, dtype=torch.float64) / k**0.5,
        "lora_B": torch.randn(n, r, generator=generator, dtype=torch.float64),
    }

    def run(function, dtype):
        inputs = leaves(tensors, dtype)
        bias = vector_view(kind, inputs["bias"], n)
        y = function(inputs["x"], inputs["weight"], bias, inputs["lora_A"], inputs["lora_B"], 0.5)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape))
        return {"y": y.detach(), **{key: leaf.grad for key, leaf in inputs.items()}}

    assert_close(run(ops.lora_linear, torch.float32), run(reference.lora_linear, torch.float64))


@pytest.mark.parametrize("kind", ["sliced", "expanded"])
@pytest.mark.parametrize("name", BACKENDS)
def test_adapter_reads_strided_biases(use_backend, name, kind):
    use_backend(name)
    generator = torch.Generator().manual_seed(1)
    d, bottleneck = 33, 12
    tensors = {
        "h": torch.randn(9, d, generator=generator, dtype=torch.float64),
        "down_weight": torch.randn(bottleneck, d, generator=generator, dtype=torch.float64) / 6,
        "down_bias": vector_base(kind, bottleneck, generator),
        "up_weight": torch.randn(d, bottleneck, generator=generator, dtype=torch.float64) / 4,
        "up_bias": vector_base(kind, d, generator),
    }

    def run(function, dtype):
        inputs = leaves(tensors, dtype)
        down_bias = vector_view(kind, inputs["down_bias"], bottleneck)
        up_bias = vector_view(kind, inputs["up_bias"], d)
        out = function(
            inputs["h"], inputs["down_weight"], down_bias, inputs["up_weight"], up_bias, 1.5,
            "gelu_new",
        )  # fmt: skip
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape))
        return {"out": out.detach(), **{key: leaf.grad for key, leaf in inputs.items()}}

    expected = run(reference.adapter_bottleneck, torch.float64)
    assert_close(run(ops.adapter_bottleneck, torch.float32), expected)


# --------------------------------------------------------------------------------------------
# 64-bit offsets


@pytest.fixture
def overflow_checks(monkeypatch, use_backend):
    """The triton backend under Triton's interpreter with its int32 overflow checks on."""
    use_backend("triton")
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))


def huge_stride(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """`tensor` (size 1 along `dim`) as a view with stride HUGE_STRIDE along `dim`, over the
    same tiny storage; it requires grad like a leaf would, through the view."""
    assert tensor.shape[dim] == 1
    strides = list(tensor.stride())
    strides[dim] = HUGE_STRIDE
    return tensor.as_strided(tensor.shape, strides)


# (operand, dimension of size 1) for LoRA, with the sizes that make that dimension 1:
# x [M, K], weight [N, K] or [K, N] (Conv1D), lora_A [r, K], lora_B [N, r], the gradient [M, N].
LORA_CASES = {
    "x-rows": ("x", 0, {"m": 1}),
    "x-columns": ("x", 1, {"k": 1}),
    "weight-rows": ("weight", 0, {"n": 1}),
    "weight-columns": ("weight", 1, {"k": 1}),
    "conv1d-weight-rows": ("weight", 0, {"k": 1, "fan_in_fan_out": True}),
    "conv1d-weight-columns": ("weight", 1, {"n": 1, "fan_in_fan_out": True}),
    "lora_A-rows": ("lora_A", 0, {"r": 1}),
    "lora_A-columns": ("lora_A", 1, {"k": 1}),
    "lora_B-rows": ("lora_B", 0, {"n": 1}),
    "lora_B-columns": ("lora_B", 1, {"r": 1}),
    "grad-rows": ("grad", 0, {"m": 1}),
    "grad-columns": ("grad", 1, {"n": 1}),
}


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_offsets_are_64_bit(overflow_checks, case, dropout_p):
    operand, dim, sizes = LORA_CASES[case]
    sizes = {"m": 5, "k": 20, "n": 24, "r": 4, "fan_in_fan_out": False} | sizes
    m, k, n, r = sizes["m"], sizes["k"], sizes["n"], sizes["r"]
    fan_in_fan_out = sizes["fan_in_fan_out"]
    generator = torch.Generator().manual_seed(2)
    shapes = {
        "x": (m, k),
        "weight": (k, n) if fan_in_fan_out else (n, k),
        "bias": (n,),
        "lora_A": (r, k),
        "lora_B": (n, r),
        "grad": (m, n),
    }
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    inputs = {name: tensor.requires_grad_(name != "grad") for name, tensor in tensors.items()}
    views = dict(inputs)
    views[operand] = huge_stride(inputs[operand], dim)
    y = ops.lora_linear(
        views["x"], views["weight"], views["bias"], views["lora_A"], views["lora_B"], 2.0,
        dropout_p, fan_in_fan_out,
    )  # fmt: skip
    y.backward(views["grad"])
    assert all(inputs[name].grad is not None for name in shapes if name != "grad")


# The adapter's operands: h [M, d_in], down_weight [m, d_in], up_weight [d_out, m], the
# residual [M, d_out] of a parallel adapter and the gradient [M, d_out]. The bottleneck 300
# takes the split kernels.
ADAPTER_CASES = {
    "h-rows": ("h", 0, {"rows": 1}),
    "h-columns": ("h", 1, {"d_in": 1}),
    "down_weight-rows": ("down_weight", 0, {"bottleneck": 1}),
    "down_weight-columns": ("down_weight", 1, {"d_in": 1}),
    "up_weight-rows": ("up_weight", 0, {"d_out": 1}),
    "up_weight-columns": ("up_weight", 1, {"bottleneck": 1}),
    "residual-rows": ("residual", 0, {"rows": 1}),
    "residual-columns": ("residual", 1, {"d_out": 1}),
    "grad-rows": ("grad", 0, {"rows": 1}),
    "grad-columns": ("grad", 1, {"d_out": 1}),
    "split-up_weight-rows": ("up_weight", 0, {"d_out": 1, "bottleneck": 300}),
    "split-grad-columns": ("grad", 1, {"d_out": 1, "bottleneck": 300}),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_adapter_offsets_are_64_bit(overflow_checks, case):
    operand, dim, sizes = ADAPTER_CASES[case]
    sizes = {"rows": 5, "d_in": 20, "d_out": 24, "bottleneck": 6} | sizes
    rows, d_in, d_out, bottleneck = (sizes[key] for key in ("rows", "d_in", "d_out", "bottleneck"))
    generator = torch.Generator().manual_seed(3)
    shapes = {
        "h": (rows, d_in),
        "down_weight": (bottleneck, d_in),
        "down_bias": (bottleneck,),
        "up_weight": (d_out, bottleneck),
        "up_bias": (d_out,),
        "residual": (rows, d_out),
        "grad": (rows, d_out),
    }
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    inputs = {name: tensor.requires_grad_(name != "grad") for name, tensor in tensors.items()}
    views = dict(inputs)
    views[operand] = huge_stride(inputs[operand], dim)
    out = ops.adapter_bottleneck(
        views["h"], views["down_weight"], views["down_bias"], views["up_weight"],
        views["up_bias"], 1.0, "silu", views["residual"],
    )  # fmt: skip
    out.backward(views["grad"])
    assert all(inputs[name].grad is not None for name in shapes if name != "grad")
