"""AutoDeltaConfig and AutoDeltaModel: build any delta model from its `delta_type`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fastdelta.delta_models.adapter import AdapterModel, ParallelAdapterModel
from fastdelta.delta_models.base import DeltaBase
from fastdelta.delta_models.bitfit import BitFitModel
from fastdelta.delta_models.config import BaseDeltaConfig
from fastdelta.delta_models.lora import LoraModel
from fastdelta.peft_format import (
    is_peft_checkpoint,
    lora_arguments,
    peft_targets,
    read_peft_config,
    read_peft_tensors,
)
from fastdelta.saving import (
    check_backbone,
    has_config,
    load_tensors,
    read_config,
    read_tensors,
    split_config,
)

DELTA_MODELS: dict[str, type[DeltaBase]] = {
    model.config_class.delta_type: model
    for model in (LoraModel, AdapterModel, ParallelAdapterModel, BitFitModel)
}
# OpenDelta delta types that fastdelta does not implement.
NOT_IMPLEMENTED = ("low_rank_adapter", "compacter", "prefix", "soft_prompt")


def delta_model_class(delta_type: str) -> type[DeltaBase]:
    """The delta model class of a `delta_type` string ("lora", "adapter", ...)."""
    if delta_type in DELTA_MODELS:
        return DELTA_MODELS[delta_type]
    supported = ", ".join(sorted(DELTA_MODELS))
    if delta_type in NOT_IMPLEMENTED:
        raise NotImplementedError(
            f"delta_type {delta_type!r} exists in OpenDelta but is not "
            f"implemented in fastdelta; the supported types are {supported}"
        )
    raise ValueError(f"Unknown delta_type {delta_type!r}; the supported types are {supported}")


class AutoDeltaConfig:
    """Builds the config class of a delta type. Not instantiated itself."""

    def __init__(self):
        raise TypeError("Use AutoDeltaConfig.from_dict({'delta_type': ..., ...})")

    @staticmethod
    def from_dict(config_dict: dict[str, Any]) -> BaseDeltaConfig:
        if "delta_type" not in config_dict:
            raise ValueError(
                "The config dict has no 'delta_type' key; add one of "
                + ", ".join(sorted(DELTA_MODELS))
            )
        return delta_model_class(config_dict["delta_type"]).config_class.from_dict(config_dict)

    @staticmethod
    def from_finetuned(finetuned_delta_path: str | Path) -> BaseDeltaConfig:
        """The config of the delta checkpoint directory `finetuned_delta_path`."""
        if is_peft_checkpoint(finetuned_delta_path) and not has_config(finetuned_delta_path):
            return AutoDeltaConfig.from_dict(
                lora_arguments(read_peft_config(finetuned_delta_path), None)
            )
        arguments, _ = split_config(read_config(finetuned_delta_path))
        return AutoDeltaConfig.from_dict(arguments)


class AutoDeltaModel:
    """Builds the delta model of a config's delta type. Not instantiated itself."""

    def __init__(self):
        raise TypeError("Use AutoDeltaModel.from_config(config, backbone_model)")

    @staticmethod
    def from_config(
        config: BaseDeltaConfig | dict[str, Any], backbone_model: nn.Module
    ) -> DeltaBase:
        if isinstance(config, dict):
            config = AutoDeltaConfig.from_dict(config)
        if not isinstance(config, BaseDeltaConfig):
            raise TypeError(
                f"config must be a delta config or its dict, got {type(config).__name__}"
            )
        return delta_model_class(config.delta_type).from_config(config, backbone_model)

    @staticmethod
    def from_finetuned(finetuned_delta_path: str | Path, backbone_model: nn.Module) -> DeltaBase:
        """Rebuild the deltas saved at `finetuned_delta_path` on `backbone_model` (a fresh copy
        of the backbone they were trained on) and load their tensors, which become the
        trainable parameters. Every key and shape is checked; a mismatch is an error.
        A PEFT LoRA directory (adapter_config.json) loads too."""
        frozen = []
        if is_peft_checkpoint(finetuned_delta_path) and not has_config(finetuned_delta_path):
            peft_config = read_peft_config(finetuned_delta_path)
            targets = peft_targets(backbone_model, peft_config)
            arguments = lora_arguments(peft_config, targets, backbone_model)
            delta_config = AutoDeltaConfig.from_dict(arguments)
            tensors = read_peft_tensors(finetuned_delta_path)
        else:
            config = read_config(finetuned_delta_path)
            arguments, metadata = split_config(config)
            check_backbone(metadata, backbone_model, finetuned_delta_path)
            delta_config = AutoDeltaConfig.from_dict(arguments)
            tensors = read_tensors(finetuned_delta_path)
            frozen = metadata.get("frozen_tensors", [])
        delta_model = delta_model_class(delta_config.delta_type).from_config(
            delta_config, backbone_model
        )
        try:
            load_tensors(delta_model, tensors, finetuned_delta_path, frozen)
        except Exception:
            delta_model.detach()
            raise
        return delta_model
