"""The adapter delta: a bottleneck MLP added to a residual, sequentially or in parallel."""

from __future__ import annotations

import torch
from torch import nn

from fastdelta import ops
from fastdelta.layers.base import DeltaLayer, linear_parameters
from fastdelta.ops.eager import autocast_dtype
from fastdelta.pseudo_input import plain_linear_layout

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
        added_to = h if residual is None else residual
        if _wider_than_autocast(added_to):
            # Under autocast the op computes and returns the autocast dtype, which would round
            # a float32 residual stream (a post-LayerNorm output) to bfloat16. As a plain
            # `residual + adapter(h)` would, add the bottleneck in the residual's dtype.
            zeros = torch.zeros(
                added_to.shape[:-1] + self.up_weight.shape[:1],
                dtype=torch.get_autocast_dtype(h.device.type),
                device=h.device,
            )
            return added_to + self._bottleneck(h, zeros)
        return self._bottleneck(h, residual)

    def _bottleneck(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return ops.adapter_bottleneck(h, *self._weights(), self.scaling, self.activation, residual)

    def fused_layout(self, host: nn.Module) -> bool | None:
        """fan_in_fan_out of `host` when this adapter can compute it with itself in one op
        (`host_forward`): a plain nn.Linear or Conv1D (see `plain_linear_layout`); else None."""
        return plain_linear_layout(host)

    def host_forward(
        self, host: nn.Module, x: torch.Tensor, parallel: bool, fan_in_fan_out: bool
    ) -> torch.Tensor:
        """The host linear layer's output with this adapter after it (`parallel`: reading x),
        as `self(host(x))` (`self(x, host(x))`) computes it; the host's forward calls it in place
        of both (fastdelta.injection.RUNS_ITS_HOST)."""
        return ops.linear_adapter(
            x,
            *linear_parameters(host),
            *self._weights(),
            self.scaling,
            self.activation,
            parallel,
            fan_in_fan_out,
        )

    def _weights(self) -> tuple[torch.Tensor, ...]:
        """(down_weight, down_bias, up_weight, up_bias), read from the parameter dictionary in
        one go (see `parameter`; a DataParallel replica holds them as attributes)."""
        own = self._parameters
        if "up_bias" in own:
            return own["down_weight"], own["down_bias"], own["up_weight"], own["up_bias"]
        return self.down_weight, self.down_bias, self.up_weight, self.up_bias

    def backend_name(self) -> str:
        (bottleneck, in_features), out_features = self.down_weight.shape, self.up_weight.shape[0]
        return ops.backend_description(
            "adapter",
            self.down_weight.device,
            self.down_weight.dtype,
            in_features=in_features,
            out_features=out_features,
            bottleneck=bottleneck,
        )

    def extra_repr(self) -> str:
        bottleneck_dim, in_features = self.down_weight.shape
        return (
            f"in_features={in_features}, bottleneck_dim={bottleneck_dim}, "
            f"out_features={self.up_weight.shape[0]}, activation={self.activation}, "
            f"scaling={self.scaling:g}"
        )


def _wider_than_autocast(tensor: torch.Tensor) -> bool:
    """Whether autocast is on for `tensor`'s device and `tensor` is wider than its dtype."""
    dtype = autocast_dtype(tensor.device)
    if dtype is None:
        return False
    return tensor.is_floating_point() and torch.promote_types(tensor.dtype, dtype) != dtype


class InputTap(nn.Module):
    """A parameterless "before" delta that keeps its host's input for a delta on a later
    module (`SpanningAdapterDelta`), which takes it once; it hands the input on unchanged."""

    delta_name = "parallel_adapter_input"
    host_parameter_names: tuple[str, ...] = ()

    def __init__(self, host_name: str):
        super().__init__()
        self.host_name = host_name
        self.held: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.held = hidden
        return hidden

    def take(self, reader_name: str) -> torch.Tensor:
        """The input kept by the last forward of the host, cleared so it is not kept alive."""
        hidden = self.held
        if hidden is None:
            raise RuntimeError(
                f"The parallel adapter on {reader_name} reads the input of {self.host_name}, "
                f"but {self.host_name} did not run before {reader_name} in this forward: "
                "pair modules that run in that order in one forward (modified_modules)"
            )
        self.held = None
        return hidden

    def clear(self) -> None:
        """Drop a kept input (the delta was taken off before reading it)."""
        self.held = None

    def extra_repr(self) -> str:
        return f"input of {self.host_name}"


class SpanningAdapterDelta(AdapterDelta):
    """A parallel adapter from one module's input to a later module's output: attached "after"
    on the output module, it adds scaling * up(act(down(x))) to that module's output, x the
    input its `input_tap` (attached "before" on the input module) kept in this forward. Its
    parameters are AdapterDelta's, under the output module; the tap has none."""

    def __init__(self, input_tap: InputTap, host_name: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_tap = input_tap
        self.host_name = host_name

    def fused_layout(self, host: nn.Module) -> None:
        """None: the adapter reads another module's input, so it cannot compute its host."""
        return None

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        """output: [..., out_features] of the output module."""
        return super().forward(self.input_tap.take(self.host_name), output)

    def on_detach(self, host: nn.Module) -> None:
        self.input_tap.clear()
