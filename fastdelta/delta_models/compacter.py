"""CompacterModel: OpenDelta's Compacter, adapters whose weights are sums of Kronecker products."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fastdelta.delta_models.base import DeltaBase, config_arguments
from fastdelta.delta_models.config import (
    BaseDeltaConfig,
    _require_bool,
    _require_finite,
    _require_positive_int,
)
from fastdelta.delta_models.low_rank_adapter import require_choice
from fastdelta.layers.factored_adapter import (
    PHM_RULE_INITS,
    PHM_WEIGHT_INITS,
    FactoredAdapterDelta,
    PHMSampler,
    reduced_features,
)
from fastdelta.ops.activations import canonical_activation

BOOLEAN_ARGUMENTS = (
    "learn_phm",
    "factorized_phm",
    "factorized_phm_rule",
    "use_bias_up_sampler",
    "use_bias_down_sampler",
)


@dataclass
class CompacterConfig(BaseDeltaConfig):
    """CompacterModel's arguments, with the names and defaults of OpenDelta 0.3.2's
    CompacterModel. (OpenDelta's CompacterConfig class defaults non_linearity to "relu" and
    has two fields the model never reads, bottleneck_dim and sequential; here the config and the
    model share the model's defaults, as every fastdelta config does.)"""

    delta_type: ClassVar[str] = "compacter"

    reduction_factor: int = 16
    non_linearity: str = "gelu_new"
    phm_c_init: str = "normal"
    hypercomplex_division: int = 4
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    shared_phm_rule: bool = False
    factorized_phm: bool = True
    shared_W_phm: bool = False
    factorized_phm_rule: bool = False
    phm_rank: int = 1
    phm_init_range: float = 0.0001
    kronecker_prod: bool | None = None
    use_bias_up_sampler: bool = True
    use_bias_down_sampler: bool = True

    def __post_init__(self):
        super().__post_init__()
        _require_positive_int(self.reduction_factor, "reduction_factor")
        canonical_activation(self.non_linearity)
        require_choice(self.phm_c_init, "phm_c_init", PHM_RULE_INITS)
        _require_positive_int(self.hypercomplex_division, "hypercomplex_division")
        if self.hypercomplex_nonlinearity == "phm":
            raise ValueError(
                "hypercomplex_nonlinearity='phm' has no initialisation (OpenDelta 0.3.2 raises "
                "a bare ValueError for it): use 'glorot-uniform' (the default), "
                "'glorot-normal' or 'normal'"
            )
        require_choice(
            self.hypercomplex_nonlinearity, "hypercomplex_nonlinearity", PHM_WEIGHT_INITS
        )
        for name in BOOLEAN_ARGUMENTS:
            _require_bool(getattr(self, name), name)
        for name in ("shared_phm_rule", "shared_W_phm"):
            _require_bool(getattr(self, name), name)
            if getattr(self, name):
                raise ValueError(
                    f"{name}=True (one set of PHM parameters shared by every layer) is not "
                    "supported, as in OpenDelta 0.3.2, which refuses it too: leave it False"
                )
        _require_positive_int(self.phm_rank, "phm_rank")
        _require_finite(self.phm_init_range, "phm_init_range")
        if self.phm_init_range < 0:
            raise ValueError(
                f"phm_init_range is the std of the 'normal' initialisation and must be >= 0, "
                f"got {self.phm_init_range}"
            )
        if self.kronecker_prod is not None:
            _require_bool(self.kronecker_prod, "kronecker_prod")


class CompacterModel(DeltaBase):
    """Compacter (Mahabadi et al., 2021) after each target: h + up(act(down(h))), h the target's
    output (its first item when the target returns a tuple), with a bottleneck of
    features // reduction_factor and each weight a PHM weight, sum_i kron(C_i, W_i) over
    n = hypercomplex_division rules C_i ([n, n]) and blocks W_i (rank-`phm_rank` products when
    `factorized_phm`, OpenDelta's default). The default targets are OpenDelta's: each layer's
    attention output projection and feed-forward output (`attn@.proj@`, `ff@.w2@`).

    Both the target's features and the bottleneck must be multiples of hypercomplex_division.
    With learn_phm=False the rules keep their random initialisation: `freeze_module` leaves
    them frozen, as OpenDelta does, and a checkpoint holds them as frozen tensors.
    `kronecker_prod` only chose how OpenDelta computed the same sum of Kronecker products; it is
    kept in the config and changes nothing. A delta's tensors are
    `<target>.compacter.{down,up}_sampler.{phm_rule,W_left,W_right,b}` (OpenDelta's, which spells
    the module `compactor`; its checkpoints load through that mapping).
    """

    config_class = CompacterConfig
    default_modified_modules = ("attn@.proj@", "ff@.w2@")

    def __init__(
        self,
        backbone_model: nn.Module,
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        common_structure: bool = False,
        interactive_modify: bool | int = False,
        backend: str = "hf",
        reduction_factor: int = 16,
        non_linearity: str = "gelu_new",
        phm_c_init: str = "normal",
        hypercomplex_division: int = 4,
        learn_phm: bool = True,
        hypercomplex_nonlinearity: str = "glorot-uniform",
        shared_phm_rule: bool = False,
        factorized_phm: bool = True,
        shared_W_phm: bool = False,
        factorized_phm_rule: bool = False,
        phm_rank: int = 1,
        phm_init_range: float = 0.0001,
        kronecker_prod: bool | None = None,
        use_bias_up_sampler: bool = True,
        use_bias_down_sampler: bool = True,
        *,
        delta_dtype: torch.dtype | str | None = None,
        name: str = "default",
    ):
        super().__init__(backbone_model, self.config_class(**config_arguments(locals())))

    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        config = self.config
        sizes = self.target_sizes(targets)
        for name in targets:
            _, features = sizes[name]
            bottleneck = reduced_features(features, config.reduction_factor, name)
            self._check_divisible(name, features, bottleneck)
            factory = self.factory_kwargs(self.backbone_model.get_submodule(name))
            sampler = {
                "w_init": config.hypercomplex_nonlinearity,
                "c_init": config.phm_c_init,
                "learn_phm": config.learn_phm,
                "factorized_phm": config.factorized_phm,
                "factorized_phm_rule": config.factorized_phm_rule,
                "phm_rank": config.phm_rank,
                "phm_init_range": config.phm_init_range,
                **factory,
            }
            n = config.hypercomplex_division
            down_sampler = PHMSampler(
                features, bottleneck, n, bias=config.use_bias_down_sampler, **sampler
            )
            up_sampler = PHMSampler(
                bottleneck, features, n, bias=config.use_bias_up_sampler, **sampler
            )
            delta = FactoredAdapterDelta(
                down_sampler,
                up_sampler,
                canonical_activation(config.non_linearity),
                delta_name="compacter",
            )
            self.insert_sequential_module(name, delta)

    def _check_divisible(self, name: str, features: int, bottleneck: int) -> None:
        """OpenDelta's PHM layers need both sides of each weight to split into n blocks."""
        n = self.config.hypercomplex_division
        if features % n == 0 and bottleneck % n == 0:
            return
        reduction = self.config.reduction_factor
        fits = [
            factor
            for factor in range(1, features + 1)
            if features // factor >= n and (features // factor) % n == 0
        ]
        closest = min(fits, key=lambda factor: abs(factor - reduction), default=None)
        fix = (
            f"choose a hypercomplex_division that divides {features}"
            if features % n
            else f"choose a reduction_factor such as {closest} (a bottleneck of "
            f"{features // closest}) or another hypercomplex_division"
        )
        raise ValueError(
            f"Compacter on {name} needs its {features} features and its bottleneck of "
            f"{features} // reduction_factor={reduction} = {bottleneck} to be multiples of "
            f"hypercomplex_division={n}: {fix}"
        )

    def freeze_module(
        self,
        module: nn.Module | None = None,
        exclude: list[str] | None = None,
        set_state_dict: bool = True,
    ) -> None:
        """DeltaBase.freeze_module; with learn_phm=False the PHM rules then stay frozen, as
        OpenDelta leaves them."""
        super().freeze_module(module, exclude, set_state_dict)
        if not self.config.learn_phm:
            for parameter in self.phm_rule_parameters():
                parameter.requires_grad_(False)

    def phm_rule_parameters(self) -> list[nn.Parameter]:
        """The PHM rules of every delta of this model."""
        return [
            parameter
            for attachment in self.attachments
            for sampler in (attachment.delta.down_sampler, attachment.delta.up_sampler)
            for parameter in sampler.rule_parameters()
        ]
