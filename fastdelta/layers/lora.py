"""The LoRA delta: a low-rank update computed together with the linear layer it modifies."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastdelta import ops
from fastdelta.layers.base import DeltaLayer


class LoraDelta(DeltaLayer):
    """LoRA on a linear layer (loralib's vocabulary): y = base(x) + scaling * (drop(x) A^T) B^T.

    lora_A: [r, in_features], kaiming-uniform; lora_B: [out_features, r], zeros, so a fresh
    delta leaves the output unchanged (`init`, PEFT's init_lora_weights: True; "gaussian" draws
    A from N(0, 1/r); False draws B kaiming-uniform too, as nn.Linear would).
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
    It replaces its host's forward so the host's matmul and the delta run as one op.
    `merge(host)` folds scaling * B A into the host's weight for inference (the host then runs
    as a plain linear layer) and `unmerge(host)` takes it back out.
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
        init: bool | str = True,
    ):
        super().__init__()
        self.r = r
        self.alpha = alpha
        self.dropout = dropout
        self.fan_in_fan_out = fan_in_fan_out
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        self.merged = False
        # A second LoRA on its layer, whose forward the first one's fused op replaces: it
        # adds its update to that output (forward), in eager PyTorch.
        self.stacked = False

    def replace_forward(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The host's output with the delta: x: [..., in_features] -> [..., out_features]."""
        if self.merged:
            self._check_not_training_merged()
            weight = host.weight.t() if self.fan_in_fan_out else host.weight
            return F.linear(x, weight, host.bias)
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

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """A stacked LoRA's output: the host's `output` plus scaling * (drop(x) A^T) B^T, the
        weights cast to x's dtype."""
        if self.merged:
            self._check_not_training_merged()
            return output
        dropped = F.dropout(x, self.dropout, self.training) if self.dropout else x
        lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return output + F.linear(F.linear(dropped, lora_A), lora_B) * self.scaling

    def _check_not_training_merged(self) -> None:
        trainable = self.lora_A.requires_grad or self.lora_B.requires_grad
        if self.training and torch.is_grad_enabled() and trainable:
            raise RuntimeError(
                "This LoRA delta is merged into its layer's weight, so training it would "
                "change nothing: call unmerge() on the delta model before training (or "
                "model.eval() / torch.no_grad() for inference)"
            )

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        """Add scaling * B A to the host's weight (computed in float32, rounded once)."""
        if not self.merged:
            self._add_to_weight(host, 1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        """Subtract what merge() added: the weight comes back to within its dtype's rounding."""
        if self.merged:
            self._add_to_weight(host, -1.0)
            self.merged = False

    def _add_to_weight(self, host: nn.Module, sign: float) -> None:
        delta = (self.lora_B.float() @ self.lora_A.float()) * (sign * self.scaling)
        weight = host.weight
        weight.copy_(weight.float() + (delta.t() if self.fan_in_fan_out else delta))

    def on_detach(self, host: nn.Module) -> None:
        self.unmerge(host)

    def backend_name(self) -> str:
        if self.merged:
            return "merged"
        if self.stacked:
            return "eager (stacked on another LoRA)"
        (out_features, rank), in_features = self.lora_B.shape, self.lora_A.shape[1]
        return ops.backend_description(
            "lora",
            self.lora_A.device,
            self.lora_A.dtype,
            in_features=in_features,
            out_features=out_features,
            rank=rank,
        )

    def extra_repr(self) -> str:
        out_features, r = self.lora_B.shape
        return (
            f"in_features={self.lora_A.shape[1]}, out_features={out_features}, r={r}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}"
            + (", merged" if self.merged else "")
        )
