"""BitFitModel: train the biases of the target modules, adding biases where there are none."""

from __future__ import annotations

import torch
from torch import nn

from fastdelta.addressing import ModuleAddresses
from fastdelta.delta_models.base import DeltaBase, config_arguments
from fastdelta.delta_models.config import BitFitConfig
from fastdelta.layers.bitfit import BiasDelta, BiasUnfreeze
from fastdelta.pseudo_input import linear_sizes


class BitFitModel(DeltaBase):
    """BitFit (Ben Zaken et al., 2022), as OpenDelta applies it.

    A target that is a single layer gets its bias trained, or a new zero bias added to its
    output when it has none (RMSNorm, bias-free linear layers). A target that is a block
    (an attention or feed-forward module) has this done to each linear and LayerNorm layer
    inside it.
    """

    config_class = BitFitConfig
    # Not switched off by name: it trains the layers' own biases in place.
    switchable = False
    # ff@.w1@ .w2@ .w3@ reach the feed-forward layers of models with no ff@ block (BART, OPT).
    default_modified_modules = (
        "attn@",
        "ff@",
        "ff@.w1@",
        "ff@.w2@",
        "ff@.w3@",
        "layer_norm@",
        "lm_head@.proj@",
    )

    def __init__(
        self,
        backbone_model: nn.Module,
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
        layers: dict[str, nn.Module] = {}
        for target in targets:
            # The target's own modules, without the deltas other delta models attached.
            own = ModuleAddresses(self.backbone_model.get_submodule(target)).modules
            if len(own) == 1:
                layers[target] = own[""]
            else:
                layers.update(
                    (f"{target}.{name}" if name else target, layer)
                    for name, layer in own.items()
                    if _is_linear_or_layer_norm(layer)
                )
        needs_bias = [name for name, layer in layers.items() if not _has_bias(layer)]
        sizes = self.target_sizes(needs_bias) if needs_bias else {}
        for name, layer in layers.items():
            if _has_bias(layer):
                self.mark_delta_module(name, BiasUnfreeze(layer.bias))
            else:
                self.insert_sequential_module(
                    name, BiasDelta(sizes[name][1], **self.factory_kwargs(layer))
                )


def _is_linear_or_layer_norm(module: nn.Module) -> bool:
    return linear_sizes(module) is not None or isinstance(module, nn.LayerNorm)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)
