"""Delta configurations: every argument of a delta model, validated where it enters.

A config is what `AutoDeltaConfig.from_dict` builds and what a delta model is constructed
from, so a model built from a config and one built from the same keyword arguments are the
same. Each delta model's constructor has the same defaults as its config (a test checks).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fastdelta.addressing import check_entries
from fastdelta.ops.activations import canonical_activation

SUPPORTED_MODEL_BACKENDS = ("hf",)


@dataclass
class BaseDeltaConfig:
    """Arguments shared by every delta model (OpenDelta's names and defaults)."""

    delta_type: ClassVar[str] = ""

    modified_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    unfrozen_modules: list[str] | None = None
    common_structure: bool = False
    interactive_modify: bool = False
    backend: str = "hf"
    # fastdelta's own: the dtype of the delta parameters ("float32", ...); None follows the
    # backbone's. Stored by name so that the config stays JSON.
    delta_dtype: str | None = None

    def __post_init__(self):
        for argument in ("modified_modules", "exclude_modules", "unfrozen_modules"):
            entries = getattr(self, argument)
            if entries is not None:
                setattr(self, argument, check_entries(entries, argument))
        if self.interactive_modify:
            raise ValueError(
                "interactive_modify is not supported by fastdelta: pass "
                "modified_modules (see Visualization(model).structure_graph())"
            )
        if self.backend not in SUPPORTED_MODEL_BACKENDS:
            raise ValueError(
                f"backend={self.backend!r} is not supported: fastdelta works on PyTorch / "
                "transformers models (backend='hf'); its compute backend is chosen with "
                "fastdelta.set_backend() or $FASTDELTA_BACKEND"
            )
        if self.delta_dtype is not None:
            self.delta_dtype = _floating_dtype_name(self.delta_dtype)

    def to_dict(self) -> dict[str, Any]:
        """Every argument, with the delta type, as plain JSON-able values."""
        return {"delta_type": self.delta_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BaseDeltaConfig:
        values = dict(values)
        delta_type = values.pop("delta_type", cls.delta_type)
        if delta_type != cls.delta_type:
            raise ValueError(
                f"{cls.__name__} is for delta_type {cls.delta_type!r}, "
                f"got {delta_type!r}; use AutoDeltaConfig.from_dict"
            )
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown {cls.delta_type} argument(s) {', '.join(unknown)}; "
                f"{cls.__name__} takes {', '.join(sorted(known))}"
            )
        return cls(**values)

    def delta_arguments(self) -> dict[str, Any]:
        """The arguments of this config as the delta model's constructor takes them."""
        return dataclasses.asdict(self)


def _floating_dtype_name(dtype) -> str:
    """The name ("float32") of a floating-point torch dtype given as a dtype or its name."""
    candidate = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(candidate, torch.dtype) or not candidate.is_floating_point:
        raise ValueError(
            "delta_dtype must be a floating-point torch dtype such as torch.float32 or "
            f"'bfloat16', got {dtype!r}"
        )
    return str(candidate).removeprefix("torch.")


def _require_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _require_finite(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass
class LoraConfig(BaseDeltaConfig):
    delta_type: ClassVar[str] = "lora"

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    # PEFT's per-module overrides: {regex: value}, a regex matching the end of a module's name
    # (at a dot boundary) gives that module its own rank or alpha.
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    def __post_init__(self):
        super().__post_init__()
        _require_positive_int(self.lora_r, "lora_r")
        _require_finite(self.lora_alpha, "lora_alpha")
        for pattern, rank in (self.rank_pattern or {}).items():
            _require_positive_int(rank, f"rank_pattern[{pattern!r}]")
        for pattern, alpha in (self.alpha_pattern or {}).items():
            _require_finite(alpha, f"alpha_pattern[{pattern!r}]")
        for argument in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, argument) or {}:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(
                        f"{argument} key {pattern!r} is not a regex: {error}"
                    ) from None
        _require_finite(self.lora_dropout, "lora_dropout")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class AdapterConfig(BaseDeltaConfig):
    delta_type: ClassVar[str] = "adapter"

    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"

    def __post_init__(self):
        super().__post_init__()
        _require_positive_int(self.bottleneck_dim, "bottleneck_dim")
        canonical_activation(self.non_linearity)


@dataclass
class ParallelAdapterConfig(AdapterConfig):
    delta_type: ClassVar[str] = "parallel_adapter"

    scaled: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _require_finite(self.scaled, "scaled")


@dataclass
class BitFitConfig(BaseDeltaConfig):
    delta_type: ClassVar[str] = "bitfit"


def pattern_value(patterns: dict | None, name: str, default):
    """The value of the first of `patterns` ({regex: value}) that matches the end of the
    module name `name` at a dot boundary (PEFT's rank_pattern rule), else `default`."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(?:.*\.)?(?:{pattern})$", name):
            return value
    return default
