"""The delta models: OpenDelta's user-facing classes."""

from fastdelta.delta_models.adapter import AdapterModel, ParallelAdapterModel
from fastdelta.delta_models.auto import AutoDeltaConfig, AutoDeltaModel
from fastdelta.delta_models.base import DeltaBase
from fastdelta.delta_models.bitfit import BitFitModel
from fastdelta.delta_models.compacter import CompacterConfig, CompacterModel
from fastdelta.delta_models.config import (
    AdapterConfig,
    BaseDeltaConfig,
    BitFitConfig,
    LoraConfig,
    ParallelAdapterConfig,
)
from fastdelta.delta_models.lora import LoraModel
from fastdelta.delta_models.low_rank_adapter import LowRankAdapterConfig, LowRankAdapterModel
from fastdelta.delta_models.prefix import PrefixConfig, PrefixModel
from fastdelta.delta_models.soft_prompt import SoftPromptConfig, SoftPromptModel

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "BaseDeltaConfig",
    "BitFitConfig",
    "BitFitModel",
    "CompacterConfig",
    "CompacterModel",
    "DeltaBase",
    "LoraConfig",
    "LoraModel",
    "LowRankAdapterConfig",
    "LowRankAdapterModel",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "PrefixConfig",
    "PrefixModel",
    "SoftPromptConfig",
    "SoftPromptModel",
]
