"""LoraModel: LoRA on the linear layers named by `modified_modules`."""

from __future__ import annotations

from torch import nn

from fastdelta.delta_models.base import DeltaBase, config_arguments
from fastdelta.delta_models.config import LoraConfig
from fastdelta.layers.lora import LoraDelta
from fastdelta.pseudo_input import is_conv1d, linear_sizes


class LoraModel(DeltaBase):
    """LoRA (Hu et al., 2021): each target linear layer computes
    base(x) + lora_alpha / lora_r * (dropout(x) A^T) B^T, with A [r, in] and B [out, r].

    Targets are `nn.Linear` or transformers' `Conv1D` (GPT-2's `c_attn` holds q, k and v in one
    layer, so its default targets `attn@.q@`, `attn@.v@` select it once).
    `use_rslora=True` scales by lora_alpha / sqrt(lora_r) instead.
    """

    config_class = LoraConfig
    default_modified_modules = ("attn@.q@", "attn@.v@")

    def __init__(
        self,
        backbone_model: nn.Module,
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        modified_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        common_structure: bool = False,
        interactive_modify: bool = False,
        backend: str = "hf",
        *,
        use_rslora: bool = False,
    ):
        super().__init__(backbone_model, self.config_class(**config_arguments(locals())))

    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        modules = {name: self.backbone_model.get_submodule(name) for name in targets}
        unsupported = [name for name, module in modules.items() if linear_sizes(module) is None]
        if unsupported:
            raise TypeError(
                "LoRA modifies nn.Linear and transformers' Conv1D layers, but "
                + ", ".join(f"{name} is a {type(modules[name]).__name__}" for name in unsupported)
                + ". Name linear layers in modified_modules"
                + _linear_children_hint(modules[unsupported[0]], unsupported[0])
            )
        config = self.config
        for name, module in modules.items():
            in_features, out_features = linear_sizes(module)
            delta = LoraDelta(
                in_features,
                out_features,
                r=config.lora_r,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                fan_in_fan_out=is_conv1d(module),
                **self.factory_kwargs(module),
            )
            self.replace_module(name, delta)


def _linear_children_hint(module: nn.Module, name: str) -> str:
    linears = [child for child, sub in module.named_modules() if child and linear_sizes(sub)]
    if not linears:
        return "."
    return f" (inside {name}: " + ", ".join(linears[:6]) + ")."
