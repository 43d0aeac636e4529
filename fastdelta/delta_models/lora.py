"""LoraModel: LoRA on the linear layers named by `modified_modules`."""

from __future__ import annotations

import torch
from torch import nn

from fastdelta.delta_models.base import DeltaBase, config_arguments
from fastdelta.delta_models.config import LoraConfig, pattern_value
from fastdelta.injection import detach_delta
from fastdelta.layers.lora import LoraDelta
from fastdelta.pseudo_input import is_conv1d, linear_sizes


class LoraModel(DeltaBase):
    """LoRA (Hu et al., 2021): each target linear layer computes
    base(x) + lora_alpha / lora_r * (dropout(x) A^T) B^T, with A [r, in] and B [out, r].

    Targets are `nn.Linear` or transformers' `Conv1D` (GPT-2's `c_attn` holds q, k and v in one
    layer, so its default targets `attn@.q@`, `attn@.v@` select it once).
    `use_rslora=True` scales by lora_alpha / sqrt(lora_r) instead. `rank_pattern` and
    `alpha_pattern` ({regex: value}, PEFT's rule) give matching modules their own rank or alpha.
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
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        delta_dtype: torch.dtype | str | None = None,
    ):
        super().__init__(backbone_model, self.config_class(**config_arguments(locals())))

    def merge(self, module: nn.Module | None = None) -> None:
        """Fold each LoRA delta (inside `module`, default all) into its layer's weight, for
        inference at the plain model's speed. The deltas stay attached; `unmerge()` takes them
        back out, and so does `detach()`. Training while merged raises an error."""
        for attachment in self._in_scope(module, attached=True, action="merge"):
            attachment.delta.merge(self.backbone_model.get_submodule(attachment.host_name))

    def unmerge(self, module: nn.Module | None = None) -> None:
        """Undo `merge()`: the weights return to their values to within their dtype's rounding."""
        for attachment in self._in_scope(module, attached=True, action="unmerge"):
            attachment.delta.unmerge(self.backbone_model.get_submodule(attachment.host_name))

    def merge_and_unload(self) -> nn.Module:
        """Fold every attached LoRA delta into its layer's weight and take fastdelta off the
        backbone, which is returned as the plain model (no fastdelta module or hook left), for
        export and serving. This delta model is empty afterwards."""
        for attachment in self.attachments:
            if attachment.attached:
                host = self.backbone_model.get_submodule(attachment.host_name)
                attachment.delta.merge(host)
                detach_delta(host, attachment.delta_name)
        self.attachments.clear()
        self._set_trainable_state_dict(False)
        return self.backbone_model

    @property
    def merged(self) -> bool:
        """Whether every attached LoRA delta is merged into its layer."""
        deltas = [a.delta for a in self.attachments if a.attached]
        return bool(deltas) and all(delta.merged for delta in deltas)

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
                r=pattern_value(config.rank_pattern, name, config.lora_r),
                alpha=pattern_value(config.alpha_pattern, name, config.lora_alpha),
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
