"""The eager reference ops against the math written out in float64, and their argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastdelta import ops
from fastdelta.ops import reference
from fastdelta.ops.activations import canonical_activation


def _lora_inputs(m, k, n, r, dtype, fan_in_fan_out=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    weight = rand(k, n) if fan_in_fan_out else rand(n, k)
    return rand(m, k), weight, rand(n), rand(r, k), rand(n, r)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("m, k, n, r", [(1, 5, 3, 1), (7, 33, 17, 4), (97, 40, 24, 16)])
def test_lora_linear_matches_the_formula(m, k, n, r, fan_in_fan_out):
    x, weight, bias, lora_A, lora_B = _lora_inputs(m, k, n, r, torch.float64, fan_in_fan_out)
    scaling = 16 / r
    w = weight.t() if fan_in_fan_out else weight
    expected = x @ w.t() + bias + scaling * (x @ lora_A.t()) @ lora_B.t()
    result = ops.lora_linear(x, weight, bias, lora_A, lora_B, scaling, 0.0, fan_in_fan_out)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


def test_lora_linear_keeps_leading_dimensions_and_handles_no_bias():
    x, weight, _, lora_A, lora_B = _lora_inputs(6, 8, 5, 2, torch.float32)
    x = x.reshape(2, 3, 8)
    result = ops.lora_linear(x, weight, None, lora_A, lora_B, 0.5)
    expected = F.linear(x, weight) + 0.5 * F.linear(F.linear(x, lora_A), lora_B)
    assert result.shape == (2, 3, 5)
    torch.testing.assert_close(result, expected)


def test_reference_lora_dropout_only_touches_the_low_rank_path():
    x, weight, bias, lora_A, lora_B = _lora_inputs(64, 16, 8, 4, torch.float64)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) >= 0.5
    dropped = reference.lora_linear(
        x, weight, bias, lora_A, lora_B, 1.0, dropout_p=0.5, keep_mask=keep
    )
    expected = F.linear(x, weight, bias) + F.linear(F.linear(x * keep * 2, lora_A), lora_B)
    torch.testing.assert_close(dropped, expected)


ACTIVATIONS_64 = {
    "relu": torch.relu,
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "gelu_new": lambda z: (
        0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    ),
    "silu": lambda z: z * torch.sigmoid(z),
}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS_64))
@pytest.mark.parametrize("d_in, d_out, bottleneck", [(9, 9, 1), (36, 52, 24), (40, 40, 300)])
def test_adapter_bottleneck_matches_the_formula(activation, d_in, d_out, bottleneck):
    generator = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    h, residual = rand(3, 5, d_in), rand(3, 5, d_out)
    down_weight, down_bias = rand(bottleneck, d_in), rand(bottleneck)
    up_weight, up_bias = rand(d_out, bottleneck), rand(d_out)
    hidden = ACTIVATIONS_64[activation](h @ down_weight.t() + down_bias)
    expected = residual + 0.7 * (hidden @ up_weight.t() + up_bias)
    result = ops.adapter_bottleneck(
        h, down_weight, down_bias, up_weight, up_bias, 0.7, activation, residual
    )
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "name, canonical",
    [("relu", "relu"), ("GELU", "gelu"), ("swish", "silu"), ("gelu_new", "gelu_new")],
)
def test_activation_names_are_canonicalised(name, canonical):
    assert canonical_activation(name) == canonical


def test_unknown_activation_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown non_linearity .tanhh.*gelu_new.*relu.*silu"):
        canonical_activation("tanhh")
