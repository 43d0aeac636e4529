"""LowRankAdapterModel: OpenDelta's low-rank adapters, each weight a product of two thin factors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fastdelta.delta_models.base import DeltaBase, config_arguments
from fastdelta.delta_models.config import BaseDeltaConfig, _require_positive_int
from fastdelta.layers.factored_adapter import (
    LOW_RANK_INITS,
    FactoredAdapterDelta,
    LowRankSampler,
    reduced_features,
)
from fastdelta.ops.activations import canonical_activation


def require_choice(value, name: str, choices: tuple[str, ...]) -> None:
    """`value` must be one of the strings `choices`: else an error naming `name` and them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass
class LowRankAdapterConfig(BaseDeltaConfig):
    """LowRankAdapterModel's arguments, with OpenDelta 0.3.2's names and defaults."""

    delta_type: ClassVar[str] = "low_rank_adapter"

    reduction_factor: int = 32
    non_linearity: str = "gelu_new"
    low_rank_w_init: str = "glorot-uniform"
    low_rank_rank: int = 1

    def __post_init__(self):
        super().__post_init__()
        _require_positive_int(self.reduction_factor, "reduction_factor")
        canonical_activation(self.non_linearity)
        require_choice(self.low_rank_w_init, "low_rank_w_init", LOW_RANK_INITS)
        _require_positive_int(self.low_rank_rank, "low_rank_rank")


class LowRankAdapterModel(DeltaBase):
    """Low-rank adapters (the baseline of the Compacter paper, Mahabadi et al., 2021) after each
    target: h + up(act(down(h))), h the target's output (its first item when the target
    returns a tuple), with a bottleneck of features // reduction_factor and each of the two
    weights the product of a [rows, low_rank_rank] and a [low_rank_rank, columns] factor (both
    glorot-initialised; the biases start at zero). The default targets are OpenDelta's: each
    layer's attention output projection and feed-forward output (`attn@.proj@`, `ff@.w2@`).

    A delta's tensors are `<target>.low_rank_adapter.{down,up}_sampler.{W_left,W_right,b}`.
    """

    config_class = LowRankAdapterConfig
    default_modified_modules = ("attn@.proj@", "ff@.w2@")

    def __init__(
        self,
        backbone_model: nn.Module,
        reduction_factor: int = 32,
        non_linearity: str = "gelu_new",
        low_rank_w_init: str = "glorot-uniform",
        low_rank_rank: int = 1,
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        common_structure: bool = False,
        interactive_modify: bool | int = False,
        backend: str = "hf",
        *,
        delta_dtype: torch.dtype | str | None = None,
        name: str = "default",
    ):
        super().__init__(backbone_model, self.config_class(**config_arguments(locals())))

    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        config = self.config
        sizes = self.target_sizes(targets)
        for name in targets:
            _, features = sizes[name]
            bottleneck = reduced_features(features, config.reduction_factor, name)
            factory = self.factory_kwargs(self.backbone_model.get_submodule(name))
            sampler = {"rank": config.low_rank_rank, "w_init": config.low_rank_w_init, **factory}
            down_sampler = LowRankSampler(features, bottleneck, **sampler)
            up_sampler = LowRankSampler(bottleneck, features, **sampler)
            delta = FactoredAdapterDelta(
                down_sampler,
                up_sampler,
                canonical_activation(config.non_linearity),
                delta_name="low_rank_adapter",
            )
            self.insert_sequential_module(name, delta)
