"""The LoRA delta: a low-rank update computed together with the linear layer it modifies."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastdelta import ops
from fastdelta.layers.base import DeltaLayer


class LoraDelta(DeltaLayer):
    """LoRA on a linear layer (loralib's vocabulary): y = base(x) + scaling * (drop(x) A^T) B^T.

    lora_A: [r, in_features], kaiming-uniform; lora_B: [out_features, r], zeros, so a fresh
    delta leaves the output unchanged. scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
    It replaces its host's forward so the host's matmul and the delta run as one op.
    """

    delta_name = "lora"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.r = r
        self.alpha = alpha
        self.dropout = dropout
        self.fan_in_fan_out = fan_in_fan_out
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def replace_forward(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The host's output with the delta: x: [..., in_features] -> [..., out_features]."""
        return ops.lora_linear(
            x,
            host.weight,
            host.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.dropout if self.training else 0.0,
            self.fan_in_fan_out,
        )

    def backend_name(self) -> str:
        return ops.resolve_backend(self.lora_A.device)

    def extra_repr(self) -> str:
        out_features, r = self.lora_B.shape
        return (
            f"in_features={self.lora_A.shape[1]}, out_features={out_features}, r={r}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}"
        )
