"""fastdelta: delta-tuning (LoRA, adapters, BitFit) for PyTorch with OpenDelta's API.

from fastdelta import LoraModel
delta_model = LoraModel(backbone_model=model, modified_modules=["query", "value"])
delta_model.freeze_module()

The names below load on first use (PEP 562), so `import fastdelta.cli` (the `fastdelta`
command) parses its arguments before torch and transformers are imported, and `--help` is
instant. `DeltaTrainer` (a transformers.Trainer whose checkpoints hold the deltas only) is left
out of `__all__`: importing transformers' Trainer takes seconds, and `from fastdelta import *`
(OpenDelta scripts' habit) should not.
"""

from __future__ import annotations

import importlib

from fastdelta.version import __version__

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
    "Visualization",
    "__version__",
    "active_deltas",
    "adapter_ids",
    "add_weighted_lora",
    "delta_names",
    "get_backend",
    "set_active",
    "set_backend",
    "supported_architectures",
]

# The module that defines each public name: the delta models' package unless named here.
_DEFINED_ELSEWHERE = {
    "get_backend": "fastdelta.ops.backend",
    "set_backend": "fastdelta.ops.backend",
    "supported_architectures": "fastdelta.structures",
    "Visualization": "fastdelta.visualization",
    "DeltaTrainer": "fastdelta.integrations",
    "active_deltas": "fastdelta.delta_models.names",
    "adapter_ids": "fastdelta.delta_models.mixed_batch",
    "delta_names": "fastdelta.delta_models.names",
    "set_active": "fastdelta.delta_models.names",
    "add_weighted_lora": "fastdelta.delta_models.weighted",
}
_EXPORTS = {
    name: _DEFINED_ELSEWHERE.get(name, "fastdelta.delta_models")
    for name in [*__all__, "DeltaTrainer"]
    if name != "__version__"
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastdelta' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
