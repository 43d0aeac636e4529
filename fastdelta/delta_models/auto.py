"""AutoDeltaConfig and AutoDeltaModel: build any delta model from its `delta_type`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fastdelta.delta_models.adapter import AdapterModel, ParallelAdapterModel
from fastdelta.delta_models.base import DeltaBase
from fastdelta.delta_models.bitfit import BitFitModel
from fastdelta.delta_models.checkpoint import (
    build_from_checkpoint,
    check_load_options,
    read_named_checkpoint,
)
from fastdelta.delta_models.compacter import CompacterModel
from fastdelta.delta_models.config import BaseDeltaConfig, config_class_for, require_dict
from fastdelta.delta_models.lora import LoraModel
from fastdelta.delta_models.low_rank_adapter import LowRankAdapterModel
from fastdelta.delta_models.prefix import PrefixModel
from fastdelta.delta_models.soft_prompt import SoftPromptModel

DELTA_MODELS: dict[str, type[DeltaBase]] = {
    model.config_class.delta_type: model
    for model in (
        LoraModel,
        AdapterModel,
        ParallelAdapterModel,
        BitFitModel,
        LowRankAdapterModel,
        CompacterModel,
        PrefixModel,
        SoftPromptModel,
    )
}


def delta_model_class(delta_type: str) -> type[DeltaBase]:
    """The delta model class of a `delta_type` string ("lora", "adapter", ...)."""
    return DELTA_MODELS[config_class_for(delta_type).delta_type]


class AutoDeltaConfig:
    """Builds the config class of a delta type. Not instantiated itself."""

    def __init__(self):
        raise TypeError("Use AutoDeltaConfig.from_dict({'delta_type': ..., ...})")

    @staticmethod
    def from_dict(config_dict: dict[str, Any], **kwargs) -> BaseDeltaConfig:
        """The config of `config_dict`'s delta type (see `BaseDeltaConfig.from_dict`: `kwargs`
        override, keys that are no argument are left out with a warning)."""
        require_dict(config_dict, "AutoDeltaConfig.from_dict")
        delta_type = config_dict.get("delta_type", kwargs.get("delta_type"))
        if delta_type is None:
            raise ValueError(
                "The config dict has no 'delta_type' key; add one of "
                + ", ".join(sorted(DELTA_MODELS))
            )
        kwargs.pop("delta_type", None)
        values = {**config_dict, "delta_type": delta_type}
        return config_class_for(delta_type).from_dict(values, **kwargs)

    @staticmethod
    def from_finetuned(finetuned_delta_path: str | Path, **kwargs) -> BaseDeltaConfig:
        """The config of the delta checkpoint directory `finetuned_delta_path` (a fastdelta
        checkpoint or a PEFT LoRA adapter, told apart by their files), `kwargs` overriding."""
        return BaseDeltaConfig.from_finetuned(finetuned_delta_path, **kwargs)


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
    def from_finetuned(
        finetuned_delta_path: str | Path,
        backbone_model: nn.Module,
        delta_config=None,
        *,
        allow_non_finite: bool = False,
        name: str | None = None,
        **options,
    ) -> DeltaBase:
        """Rebuild the deltas saved at `finetuned_delta_path` on `backbone_model` (a fresh copy
        of the backbone they were trained on, or one carrying other delta models) and load their
        tensors, which become the trainable parameters. Every config field, key, shape and dtype
        is checked; a mismatch is an error and leaves the backbone as it was. A PEFT LoRA
        directory (adapter_config.json) loads too. Tensors holding NaN or Inf are refused unless
        `allow_non_finite`.

        `name` names the delta model (by default the name it was saved under; "default" for
        PEFT adapters), so that it loads beside other named delta models (`fastdelta.set_active`
        chooses which run). Where the directory holds checkpoints in subdirectories, as PEFT's
        `save_pretrained` writes every adapter but "default" to `<dir>/<adapter_name>/`, `name`
        picks `<dir>/<name>/`.

        OpenDelta's arguments are taken: `delta_config` (must be the saved config),
        `cache_dir`, `force_download`, `local_files_only`, `check_hash` (nothing to download:
        the path is a local directory, and the backbone is always checked)."""
        checkpoint = read_named_checkpoint(finetuned_delta_path, backbone_model, name)
        check_load_options(checkpoint, {"delta_config": delta_config, **options})
        return build_from_checkpoint(
            delta_model_class(checkpoint.delta_type),
            checkpoint,
            backbone_model,
            allow_non_finite=allow_non_finite,
        )
