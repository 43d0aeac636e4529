"""AdapterModel (sequential) and ParallelAdapterModel: bottleneck adapters on target modules."""

from __future__ import annotations

import torch
from torch import nn

from fastdelta.delta_models.base import DeltaBase, config_arguments
from fastdelta.delta_models.config import AdapterConfig, ParallelAdapterConfig
from fastdelta.layers.adapter import AdapterDelta
from fastdelta.ops.activations import canonical_activation


class AdapterModel(DeltaBase):
    """Houlsby-style adapters after each target: h + up(act(down(h))), h the target's output
    (its first item when the target returns a tuple)."""

    config_class = AdapterConfig
    default_modified_modules = ("attn@.proj@", "ff@.w2@")

    def __init__(
        self,
        backbone_model: nn.Module,
        bottleneck_dim: int = 24,
        non_linearity: str = "gelu_new",
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        common_structure: bool = False,
        interactive_modify: bool = False,
        backend: str = "hf",
        *,
        delta_dtype: torch.dtype | str | None = None,
    ):
        super().__init__(backbone_model, self.config_class(**config_arguments(locals())))

    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        sizes = self.target_sizes(targets)
        for name in targets:
            _, features = sizes[name]
            delta = AdapterDelta(
                features,
                features,
                self.config.bottleneck_dim,
                canonical_activation(self.config.non_linearity),
                delta_name="adapter",
                **self.factory_kwargs(self.backbone_model.get_submodule(name)),
            )
            self.insert_sequential_module(name, delta)


class ParallelAdapterModel(DeltaBase):
    """Parallel adapters (He et al., 2022): each target's output gets
    scaled * up(act(down(x))) added, x the target's input."""

    config_class = ParallelAdapterConfig
    default_modified_modules = ("attn@", "ff@")

    def __init__(
        self,
        backbone_model: nn.Module,
        bottleneck_dim: int = 24,
        non_linearity: str = "gelu_new",
        scaled: float = 1.0,
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        common_structure: bool = False,
        interactive_modify: bool = False,
        backend: str = "hf",
        *,
        delta_dtype: torch.dtype | str | None = None,
    ):
        super().__init__(backbone_model, self.config_class(**config_arguments(locals())))

    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        sizes = self.target_sizes(targets)
        integer_input = [name for name in targets if sizes[name][0] is None]
        if integer_input:
            raise TypeError(
                f"A parallel adapter reads its target's floating-point input, but "
                f"{', '.join(integer_input)} take integer inputs (token ids); "
                "target modules inside the network instead"
            )
        for name in targets:
            in_features, out_features = sizes[name]
            delta = AdapterDelta(
                in_features,
                out_features,
                self.config.bottleneck_dim,
                canonical_activation(self.config.non_linearity),
                scaling=self.config.scaled,
                delta_name="parallel_adapter",
                **self.factory_kwargs(self.backbone_model.get_submodule(name)),
            )
            self.insert_parallel_module(name, delta)
