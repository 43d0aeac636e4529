"""fastdelta: delta-tuning (LoRA, adapters, BitFit) for PyTorch with OpenDelta's API.

from fastdelta import LoraModel
delta_model = LoraModel(backbone_model=model, modified_modules=["query", "value"])
delta_model.freeze_module()

`DeltaTrainer` (a transformers.Trainer whose checkpoints hold the deltas only) is imported on
first use, since importing transformers' Trainer takes seconds; it is left out of `__all__`, so
`from fastdelta import *` (OpenDelta scripts' habit) does not import it either.
"""

from fastdelta.delta_models import (
    AdapterConfig,
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BaseDeltaConfig,
    BitFitConfig,
    BitFitModel,
    CompacterConfig,
    CompacterModel,
    DeltaBase,
    LoraConfig,
    LoraModel,
    LowRankAdapterConfig,
    LowRankAdapterModel,
    ParallelAdapterConfig,
    ParallelAdapterModel,
)
from fastdelta.ops.backend import get_backend, set_backend
from fastdelta.structures import supported_architectures
from fastdelta.version import __version__
from fastdelta.visualization import Visualization

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
    "Visualization",
    "__version__",
    "get_backend",
    "set_backend",
    "supported_architectures",
]


def __getattr__(name: str):
    if name == "DeltaTrainer":
        from fastdelta.integrations import DeltaTrainer

        return DeltaTrainer
    raise AttributeError(f"module 'fastdelta' has no attribute {name!r}")
