"""Delta configurations: every argument of a delta model, validated where it enters.

A config is what `AutoDeltaConfig.from_dict` builds and what a delta model is constructed
from, so a model built from a config and one built from the same keyword arguments are the
same. Each delta model's constructor has the same defaults as its config (a test checks).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import warnings
from dataclasses import InitVar, dataclass
from typing import Any, ClassVar

import torch

from fastdelta.addressing import check_entries, pattern_matches
from fastdelta.checkpoint_io import named_directory
from fastdelta.delta_models.names import DEFAULT_NAME, check_name
from fastdelta.layers.lora import DORA_DROPOUT_FORMS
from fastdelta.ops.activations import canonical_activation
from fastdelta.peft_format import as_entries, base_changing_init

SUPPORTED_MODEL_BACKENDS = ("hf",)
# OpenDelta's options for fetching a checkpoint from a hub, which fastdelta (local directories
# only) accepts and has nothing to do with.
DOWNLOAD_OPTIONS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "resume_download",
    "proxies",
    "use_auth_token",
    "revision",
    "check_hash",
)
# The largest rank or bottleneck width accepted: wider than any layer of any model, so a larger
# value is a typo or an overflow (2**40 would reach the allocator as a raw error).
MAX_DELTA_WIDTH = 2**16


@dataclass
class BaseDeltaConfig:
    """Arguments shared by every delta model (OpenDelta's names and defaults)."""

    delta_type: ClassVar[str] = ""
    # PEFT's names of arguments this config also takes: {PEFT's name: fastdelta's name}.
    peft_names: ClassVar[dict[str, str]] = {}

    modified_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    unfrozen_modules: list[str] | None = None
    common_structure: bool = False
    # True or a port number (True: 8888): the modules are chosen on a local web page
    # (fastdelta.interactive) when the delta model is built, and the config then holds them.
    interactive_modify: bool | int = False
    backend: str = "hf"
    # fastdelta's own: the dtype of the delta parameters ("float32", ...); None follows the
    # backbone's. Stored by name so that the config stays JSON.
    delta_dtype: str | None = None
    # fastdelta's own: the delta model's name, which fastdelta.set_active chooses by.
    name: str = DEFAULT_NAME

    def __post_init__(self):
        check_name(self.name)
        for argument in ("modified_modules", "exclude_modules", "unfrozen_modules"):
            entries = getattr(self, argument)
            if entries is not None:
                setattr(self, argument, check_entries(entries, argument))
        _require_bool(self.common_structure, "common_structure")
        _check_interactive(self.interactive_modify)
        if self.interactive_modify and (
            self.modified_modules is not None or self.exclude_modules is not None
        ):
            raise ValueError(
                "interactive_modify chooses the modified modules on a web page: pass it "
                "without modified_modules and exclude_modules"
            )
        if not isinstance(self.backend, str) or self.backend not in SUPPORTED_MODEL_BACKENDS:
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
    def from_dict(cls, values: dict[str, Any], **kwargs):
        """The config of the arguments in `values`, overridden by those in `kwargs`, as
        OpenDelta's `from_dict` builds it. Keys that are no argument of this delta type are
        left out with a warning naming them (OpenDelta's training scripts pass their whole
        argument dataclass), unless one is a near miss of an argument (`lora_rr`): that is an
        error naming the argument. With `return_unused_kwargs=True`, returns (config, the
        kwargs that are no argument) instead, without warning about those."""
        require_dict(values, f"{cls.__name__}.from_dict")
        return_unused = kwargs.pop("return_unused_kwargs", False)
        values = dict(values)
        delta_type = values.pop("delta_type", cls.delta_type)
        if delta_type != cls.delta_type:
            raise ValueError(
                f"{cls.__name__} is for delta_type {cls.delta_type!r}, "
                f"got {delta_type!r}; use AutoDeltaConfig.from_dict"
            )
        known = {field.name for field in dataclasses.fields(cls)} | set(cls.peft_names)
        unused = {key: value for key, value in kwargs.items() if key not in known}
        values.update((key, value) for key, value in kwargs.items() if key in known)
        ignored = {key: value for key, value in values.items() if key not in known}
        cls._check_unknown(ignored if return_unused else {**ignored, **unused}, known)
        config = cls(**{key: value for key, value in values.items() if key in known})
        return (config, unused) if return_unused else config

    @classmethod
    def _check_unknown(cls, unknown: dict[str, Any], known: set[str]) -> None:
        """Refuse a near miss of an argument's name; warn about the other unknown keys."""
        for key in sorted(unknown):
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.8)
            if close:
                raise ValueError(
                    f"{key!r} is no {cls.delta_type} argument: did you mean {close[0]!r}? "
                    f"{cls.__name__} takes {', '.join(sorted(known))}"
                )
        if unknown:
            warnings.warn(
                f"{cls.__name__} ignores {', '.join(map(repr, sorted(unknown)))}, which are no "
                f"{cls.delta_type} arguments (it takes {', '.join(sorted(known))})",
                stacklevel=3,
            )

    @classmethod
    def from_finetuned(cls, finetuned_delta_path, **kwargs):
        """The config saved in the delta checkpoint directory `finetuned_delta_path` (either
        format), with `kwargs` overriding its arguments. OpenDelta's download options
        (`cache_dir`, `force_download`, `local_files_only`, ...) have nothing to do: fastdelta
        reads local directories only."""
        from fastdelta.delta_models.checkpoint import read_arguments

        for option in DOWNLOAD_OPTIONS:
            kwargs.pop(option, None)
        finetuned_delta_path = named_directory(finetuned_delta_path, kwargs.get("name"))
        arguments = read_arguments(finetuned_delta_path)
        if arguments["delta_type"] != cls.delta_type and cls is not BaseDeltaConfig:
            raise ValueError(
                f"{str(finetuned_delta_path)!r} holds delta_type {arguments['delta_type']!r}, "
                f"which {cls.__name__} cannot read: use AutoDeltaConfig.from_finetuned"
            )
        return config_class_for(arguments["delta_type"]).from_dict(arguments, **kwargs)

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


def require_dict(values, where: str) -> None:
    """A config given as a dict must be one (JSON's null or a list would fail inside Python)."""
    if not isinstance(values, dict):
        raise TypeError(
            f"{where} takes a dict of arguments such as {{'delta_type': 'lora', 'lora_r': 8}}, "
            f"got {type(values).__name__} {values!r}"
        )


def config_class_for(delta_type) -> type[BaseDeltaConfig]:
    """The config class of a `delta_type` string ("lora", "adapter", ...)."""
    classes = {cls.delta_type: cls for cls in _config_classes()}
    if isinstance(delta_type, str) and delta_type in classes:
        return classes[delta_type]
    supported = ", ".join(sorted(classes))
    raise ValueError(f"Unknown delta_type {delta_type!r}; the supported types are {supported}")


def _config_classes() -> tuple[type[BaseDeltaConfig], ...]:
    # Defined with their delta models, which import this module: imported when first asked for.
    from fastdelta.delta_models.compacter import CompacterConfig
    from fastdelta.delta_models.low_rank_adapter import LowRankAdapterConfig
    from fastdelta.delta_models.prefix import PrefixConfig
    from fastdelta.delta_models.soft_prompt import SoftPromptConfig

    return (
        LoraConfig,
        AdapterConfig,
        ParallelAdapterConfig,
        BitFitConfig,
        LowRankAdapterConfig,
        CompacterConfig,
        PrefixConfig,
        SoftPromptConfig,
    )


def _require_bool(value, name: str) -> None:
    # A string such as "false" is truthy: only real booleans are accepted.
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


# PEFT's init_lora_weights values that fastdelta has not: they need data or a quantizer.
OTHER_PEFT_INITS = ("corda", "loftq", "eva", "lora_ga", "mica", "orthogonal")


def _check_lora_init(value) -> None:
    if isinstance(value, bool) or value == "gaussian" or base_changing_init(value):
        return
    if value in OTHER_PEFT_INITS:
        raise ValueError(
            f"init_lora_weights={value!r} is PEFT's, which fastdelta does not have: use True "
            "(the default), 'gaussian', False, 'pissa', 'pissa_niter_K' or 'olora'"
        )
    raise ValueError(
        "init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K "
        f"iterations) or 'olora' (PEFT's names), got {value!r}"
    )


def _check_interactive(value) -> None:
    """interactive_modify is a bool or a port number (as in OpenDelta, 0 is off)."""
    is_port = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535
    if not (isinstance(value, bool) or is_port):
        raise TypeError(
            f"interactive_modify must be True, False or a port number (0-65535), got {value!r}"
        )


def _require_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value > MAX_DELTA_WIDTH:
        raise ValueError(
            f"{name}={value} is wider than any layer of any model (the limit is "
            f"{MAX_DELTA_WIDTH}): a rank or bottleneck width is at most the layer's features"
        )


def _require_patterns(patterns, name: str) -> None:
    if patterns is not None and (
        not isinstance(patterns, dict) or not all(isinstance(key, str) for key in patterns)
    ):
        raise TypeError(
            f"{name} must be a dict {{module regex: value}} such as {{'value': 4}}, got "
            f"{patterns!r}"
        )


def _require_finite(value, name: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        finite = number and math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass
class LoraConfig(BaseDeltaConfig):
    """LoRA's arguments. PEFT's names are taken too, and stored under fastdelta's: `r` for
    `lora_r`, `target_modules` for `modified_modules` (a string is PEFT's regex over the whole
    module name) and `modules_to_save` for the head that trains with the deltas
    (`unfrozen_modules=["deltas", *modules_to_save]`); giving both names of one argument with
    different values is an error. `lora_alpha` and `lora_dropout` are the same in both."""

    delta_type: ClassVar[str] = "lora"
    peft_names: ClassVar[dict[str, str]] = {
        "r": "lora_r",
        "target_modules": "modified_modules",
        "modules_to_save": "unfrozen_modules",
    }

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    # PEFT's per-module overrides: {regex: value}, a regex matching the end of a module's name
    # (at a dot boundary) gives that module its own rank or alpha.
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    # PEFT's initialisation (its name and values): True, A kaiming-uniform and B zeros (a fresh
    # delta changes nothing); "gaussian", A ~ N(0, 1/r) and B zeros; False, both kaiming-uniform
    # (the delta starts non-zero, for tests); "pissa" / "pissa_niter_K" / "olora", A and B from
    # the base weight's SVD / QR, scaling * B A taken out of the base weight.
    init_lora_weights: bool | str = True
    # DoRA (PEFT's name): a trained magnitude per output feature scales the output row-wise.
    use_dora: bool = False
    # fastdelta's: how DoRA applies lora_dropout. "peft", PEFT's form (its results exactly; the
    # base product takes the dropped input too, a second base GEMM); "low_rank", the DoRA
    # paper's (dropout on the low-rank path only: one fused op, one base GEMM).
    dora_dropout: str = "peft"
    # fastdelta's: the norm's gradient reaches A and B (and a trainable W); by default the
    # norm is a constant of the backward, as in the DoRA paper (section 4.3) and PEFT.
    dora_exact_norm: bool = False
    # fastdelta's: pad every delta's A and B with zeros to this rank, so that checkpoints of any
    # rank up to it can be hot-swapped in (LoraModel.hot_swap); None: A and B have their rank.
    max_rank: int | None = None
    # PEFT's names, translated by __post_init__ (not fields: a config holds fastdelta's names).
    r: InitVar[int | None] = None
    target_modules: InitVar[list[str] | str | None] = None
    modules_to_save: InitVar[list[str] | None] = None

    def __post_init__(self, r, target_modules, modules_to_save):
        self._take_peft_names(r, target_modules, modules_to_save)
        super().__post_init__()
        _require_positive_int(self.lora_r, "lora_r")
        _require_finite(self.lora_alpha, "lora_alpha")
        _require_bool(self.use_rslora, "use_rslora")
        _require_patterns(self.rank_pattern, "rank_pattern")
        _require_patterns(self.alpha_pattern, "alpha_pattern")
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
        _check_lora_init(self.init_lora_weights)
        _require_bool(self.use_dora, "use_dora")
        if self.use_dora and base_changing_init(self.init_lora_weights):
            raise ValueError(
                f"use_dora with init_lora_weights={self.init_lora_weights!r} is not supported: "
                "a PiSSA / OLoRA checkpoint is saved as the plain LoRA it amounts to, which a "
                "DoRA magnitude does not fit; choose one of the two"
            )
        _check_dora_options(self.use_dora, self.dora_dropout, self.dora_exact_norm)
        _check_max_rank(self)
        _require_finite(self.lora_dropout, "lora_dropout")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        zero = ["lora_alpha"] if self.lora_alpha == 0 else []
        zero += [f"alpha_pattern[{k!r}]" for k, v in (self.alpha_pattern or {}).items() if v == 0]
        if zero:
            warnings.warn(
                f"{', '.join(zero)} = 0 scales the LoRA deltas it applies to by 0, so they change "
                "nothing and get no gradient: give it a non-zero value (commonly 2 * lora_r)",
                UserWarning,
                stacklevel=3,
            )

    def _take_peft_names(self, r, target_modules, modules_to_save) -> None:
        """Store the values given under PEFT's names under fastdelta's."""
        if r is not None:
            self._take("r", r, "lora_r")
        if target_modules is not None:
            if target_modules == "all-linear":
                raise ValueError(
                    "target_modules='all-linear' is PEFT's: fastdelta names the layers in "
                    "modified_modules (e.g. ['attn@.q@', 'attn@.v@', 'ff@.w1@', 'ff@.w2@'])"
                )
            if not isinstance(target_modules, (str, list, tuple)):
                raise TypeError(
                    "target_modules (PEFT's name for modified_modules) must be a list of module "
                    f"names or a regex string, got {target_modules!r}"
                )
            self._take("target_modules", as_entries(target_modules), "modified_modules")
        if modules_to_save is not None:
            if isinstance(modules_to_save, str) or not isinstance(modules_to_save, (list, tuple)):
                raise TypeError(
                    f"modules_to_save must be a list of module names, got {modules_to_save!r}"
                )
            entries = ["deltas", *modules_to_save]
            self._take("modules_to_save", entries, "unfrozen_modules")

    def _take(self, peft_name: str, value, name: str) -> None:
        """Set `name` to `value`, given as `peft_name`, unless `name` was given another value."""
        current = getattr(self, name)
        default = next(field.default for field in dataclasses.fields(self) if field.name == name)
        if current != default and current != value:
            raise ValueError(
                f"{peft_name} is PEFT's name for fastdelta's {name}, and both are given "
                f"({peft_name}={value!r}, {name}={current!r}): give {name} only"
            )
        setattr(self, name, value)


def _check_dora_options(use_dora, dora_dropout, dora_exact_norm) -> None:
    if dora_dropout not in DORA_DROPOUT_FORMS:
        raise ValueError(
            f"dora_dropout must be 'peft' (PEFT's DoRA dropout: its results, two base GEMMs) or "
            f"'low_rank' (the DoRA paper's: dropout on the low-rank path, one fused op), got "
            f"{dora_dropout!r}"
        )
    _require_bool(dora_exact_norm, "dora_exact_norm")
    given = [
        name
        for name, value, default in (
            ("dora_dropout", dora_dropout, "peft"),
            ("dora_exact_norm", dora_exact_norm, False),
        )
        if value != default
    ]
    if given and not use_dora:
        raise ValueError(
            f"{' and '.join(given)} configure DoRA deltas, and use_dora is False: pass "
            "use_dora=True too, or leave them out"
        )


def _check_max_rank(config: LoraConfig) -> None:
    """max_rank pads plain LoRA deltas for hot-swapping: at least every rank, and not with DoRA
    or an initialisation that changes the base weight (which a swapped-in adapter does not fit)."""
    if config.max_rank is None:
        return
    _require_positive_int(config.max_rank, "max_rank")
    ranks = {"lora_r": config.lora_r}
    patterns = config.rank_pattern or {}
    ranks.update((f"rank_pattern[{pattern!r}]", rank) for pattern, rank in patterns.items())
    larger = [f"{argument}={rank}" for argument, rank in ranks.items() if rank > config.max_rank]
    if larger:
        raise ValueError(
            f"max_rank={config.max_rank} is the rank A and B are padded to, and "
            f"{', '.join(larger)} exceeds it: give a max_rank at least as large as every rank"
        )
    if config.use_dora or base_changing_init(config.init_lora_weights):
        what = "use_dora" if config.use_dora else f"init_lora_weights={config.init_lora_weights!r}"
        raise ValueError(
            f"max_rank pads LoRA deltas so that other checkpoints can be hot-swapped in, and "
            f"{what} makes deltas that a swapped-in adapter does not fit (a magnitude per "
            "output, or a base weight changed by the initialisation): leave max_rank out"
        )


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
        if pattern_matches(pattern, name):
            return value
    return default
