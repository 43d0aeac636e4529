"""BitFit's deltas: train a module's existing bias, or add a bias where it has none."""

from __future__ import annotations

import torch
from torch import nn

from fastdelta.layers.base import DeltaLayer


class BiasDelta(DeltaLayer):
    """A zero-initialised bias [features] added to the host's output."""

    delta_name = "bitfit"

    def __init__(self, features: int, device=None, dtype=None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        # In the output's dtype, as a layer's own bias: a float32 bias on a bfloat16 model
        # (delta_dtype) must not turn the activations float32.
        return output + self.bias.to(output.dtype)

    def extra_repr(self) -> str:
        return f"features={self.bias.shape[0]}"


class BiasUnfreeze(DeltaLayer):
    """Marks the host's own `bias` as a delta parameter; takes no part in the forward.

    It keeps the bias the backbone came with (a non-persistent buffer, so it is never saved)
    and swaps it with the trained one on detach and back on attach, so a detached model
    computes exactly what the original backbone did. While detached, the host's bias (then the
    original one) is frozen: an optimizer step would otherwise change the original backbone,
    and another delta model would save it as a trained tensor of its own. Attaching gives the
    bias back the requires_grad it had.
    """

    delta_name = "bitfit"
    host_parameter_names = ("bias",)

    def __init__(self, host_bias: torch.Tensor):
        super().__init__()
        self.register_buffer("other_bias", host_bias.detach().clone(), persistent=False)
        self.trained_requires_grad = host_bias.requires_grad

    @torch.no_grad()
    def swap_biases(self, host: nn.Module) -> None:
        trained = host.bias.detach().clone()
        host.bias.copy_(self.other_bias)
        self.other_bias.copy_(trained)

    def on_detach(self, host: nn.Module) -> None:
        self.swap_biases(host)
        self.trained_requires_grad = host.bias.requires_grad
        host.bias.requires_grad_(False)

    def on_attach(self, host: nn.Module) -> None:
        self.swap_biases(host)
        host.bias.requires_grad_(self.trained_requires_grad)
