"""The adapter delta: a bottleneck MLP added to a residual, sequentially or in parallel."""

from __future__ import annotations

import torch
from torch import nn

from fastdelta import ops
from fastdelta.layers.base import DeltaLayer

INIT_STD = 0.01


class AdapterDelta(DeltaLayer):
    """residual + scaling * (act(h D^T + b_d) U^T + b_u).

    down_weight D: [bottleneck_dim, in_features]; up_weight U: [out_features, bottleneck_dim].
    Weights start normal(0, 0.01) and biases zero, as in OpenDelta, so a fresh adapter is
    close to the identity. Sequentially (`delta(h)`) the residual is h itself; in parallel
    (`delta(h, residual)`) it is the host's output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bottleneck_dim: int,
        activation: str,
        scaling: float = 1.0,
        delta_name: str = "adapter",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.delta_name = delta_name
        self.activation = activation
        self.scaling = scaling
        factory = {"device": device, "dtype": dtype}
        self.down_weight = nn.Parameter(torch.empty(bottleneck_dim, in_features, **factory))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck_dim, **factory))
        self.up_weight = nn.Parameter(torch.empty(out_features, bottleneck_dim, **factory))
        self.up_bias = nn.Parameter(torch.zeros(out_features, **factory))
        nn.init.normal_(self.down_weight, std=INIT_STD)
        nn.init.normal_(self.up_weight, std=INIT_STD)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """h: [..., in_features]; residual: [..., out_features], h when None."""
        return ops.adapter_bottleneck(
            h,
            self.down_weight,
            self.down_bias,
            self.up_weight,
            self.up_bias,
            self.scaling,
            self.activation,
            residual,
        )

    def backend_name(self) -> str:
        return ops.resolve_backend(self.down_weight.device, self.down_weight.dtype)

    def extra_repr(self) -> str:
        bottleneck_dim, in_features = self.down_weight.shape
        return (
            f"in_features={in_features}, bottleneck_dim={bottleneck_dim}, "
            f"out_features={self.up_weight.shape[0]}, activation={self.activation}, "
            f"scaling={self.scaling:g}"
        )
