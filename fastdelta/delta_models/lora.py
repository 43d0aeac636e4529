"""LoraModel: LoRA on the linear layers named by `modified_modules`."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fastdelta.addressing import pattern_matches
from fastdelta.delta_models.base import DeltaBase, config_arguments
from fastdelta.delta_models.config import LoraConfig, pattern_value
from fastdelta.delta_models.hot_swap import hot_swap, pad_rank
from fastdelta.delta_models.targets import check_forward_replaceable, check_mergeable
from fastdelta.injection import detach_delta
from fastdelta.layers.base import attached_deltas
from fastdelta.layers.lora import LoraDelta, LoraEmbeddingDelta
from fastdelta.peft_format import base_changing_init
from fastdelta.pseudo_input import is_conv1d, linear_sizes


class LoraModel(DeltaBase):
    """LoRA (Hu et al., 2021): each target linear layer computes
    base(x) + lora_alpha / lora_r * (dropout(x) A^T) B^T, with A [r, in] and B [out, r].

    Targets are `nn.Linear` or transformers' `Conv1D` (GPT-2's `c_attn` holds q, k and v in one
    layer, so its default targets `attn@.q@`, `attn@.v@` select it once).
    `use_rslora=True` scales by lora_alpha / sqrt(lora_r) instead. `use_dora=True` makes the
    deltas DoRA's (a magnitude per output feature scales the output; on an embedding, per
    embedding column, as PEFT's, without dropout): `dora_dropout` chooses
    how it applies lora_dropout ("peft", PEFT's form and results; "low_rank", the DoRA paper's,
    one fused op) and `dora_exact_norm=True` lets the norm's gradient reach A and B.
    `rank_pattern` and `alpha_pattern` ({regex: value}, PEFT's rule) give matching modules
    their own rank or alpha.
    PEFT's argument names `r`, `target_modules` and `modules_to_save` are taken too (see
    `LoraConfig`). `max_rank` pads A and B with zeros to that rank, for `hot_swap`.
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
        interactive_modify: bool | int = False,
        backend: str = "hf",
        *,
        use_rslora: bool = False,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
        dora_dropout: str = "peft",
        dora_exact_norm: bool = False,
        delta_dtype: torch.dtype | str | None = None,
        name: str = "default",
        max_rank: int | None = None,
        r: int | None = None,
        target_modules: list[str] | str | None = None,
        modules_to_save: list[str] | None = None,
    ):
        super().__init__(backbone_model, self.config_class(**config_arguments(locals())))

    def hot_swap(self, checkpoint, name: str | None = None) -> None:
        """Replace the deltas' weights by those of `checkpoint` in place: a LoRA checkpoint
        directory (fastdelta or PEFT; `name` picks `<dir>/<name>/` as in from_finetuned) on the
        same modules, of any rank up to this model's (build it with `max_rank` to swap in larger
        ones), or a state dict keyed as `state_dict()`, at this model's scaling. Nothing is
        re-attached and no attribute changes, so a torch.compile'd model does not recompile:
        the checkpoint's lora_alpha / r is folded into B (see fastdelta.delta_models.hot_swap),
        and the layers keep this model's scaling and dropout. Everything is checked first."""
        hot_swap(self, checkpoint, name)

    def merge(self, module: nn.Module | None = None) -> None:
        """Fold each LoRA delta (inside `module`, default all) into its layer's weight, for
        inference at the plain model's speed. The deltas stay attached; `unmerge()` takes them
        back out, and so does `detach()`. Training while merged raises an error. A weight tied
        to another module's (an LM head tied to the embeddings) is refused before any merge."""
        selected = self._in_scope(module, attached=True, action="merge")
        self._check_active("merge")
        check_mergeable(self.backbone_model, [a.host_name for a in selected])
        for attachment in selected:
            attachment.delta.merge(self.backbone_model.get_submodule(attachment.host_name))

    def unmerge(self, module: nn.Module | None = None) -> None:
        """Undo `merge()`: the weights return to their values to within their dtype's rounding."""
        for attachment in self._in_scope(module, attached=True, action="unmerge"):
            attachment.delta.unmerge(self.backbone_model.get_submodule(attachment.host_name))

    def merge_and_unload(self) -> nn.Module:
        """Fold every attached LoRA delta into its layer's weight and take fastdelta off the
        backbone, which is returned as the plain model (no fastdelta module or hook left), for
        export and serving. This delta model is empty afterwards."""
        self._check_active("merge_and_unload")
        check_mergeable(self.backbone_model, [a.host_name for a in self.attachments if a.attached])
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
        unsupported = [name for name, module in modules.items() if _lora_sizes(module) is None]
        if unsupported:
            raise TypeError(
                "LoRA modifies nn.Linear, transformers' Conv1D and nn.Embedding layers, but "
                + ", ".join(f"{name} is a {type(modules[name]).__name__}" for name in unsupported)
                + ". Name linear layers in modified_modules"
                + _linear_children_hint(modules[unsupported[0]], unsupported[0])
            )
        for name, module in modules.items():
            if not isinstance(module, nn.Embedding):
                check_forward_replaceable(module, name)
        config = self.config
        for argument in ("rank_pattern", "alpha_pattern"):
            _check_patterns_match(getattr(config, argument), argument, list(modules))
        ranks = {name: pattern_value(config.rank_pattern, name, config.lora_r) for name in modules}
        oversized = [name for name in modules if ranks[name] > min(_lora_sizes(modules[name]))]
        if oversized:
            name = oversized[0]
            warnings.warn(
                f"The LoRA rank {ranks[name]} exceeds min(in_features, out_features) = "
                f"{min(_lora_sizes(modules[name]))} of {name}"
                + (f" and {len(oversized) - 1} more layers" if oversized[1:] else "")
                + ": B A has at most that rank, so the rest adds parameters and no capacity; a "
                "smaller lora_r (or rank_pattern entries for these layers) trains the same",
                UserWarning,
                stacklevel=4,
            )
        from_weight = []  # PiSSA / OLoRA deltas: their hosts' weights change once all attach
        dora = []  # DoRA deltas: their magnitudes start from the weights as the model sees them
        for name, module in modules.items():
            if isinstance(module, nn.Embedding):
                delta = pad_rank(self._embedding_delta(name, module, ranks[name]), config.max_rank)
                self.replace_module(name, delta)
                if config.use_dora:
                    # PEFT applies no dropout to an embedding: dora_dropout has nothing to do.
                    delta.initialise_magnitude(module.weight, config.dora_exact_norm)
                continue
            in_features, out_features = linear_sizes(module)
            delta = LoraDelta(
                in_features,
                out_features,
                r=ranks[name],
                alpha=pattern_value(config.alpha_pattern, name, config.lora_alpha),
                dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                fan_in_fan_out=is_conv1d(module),
                init=config.init_lora_weights,
                **self.factory_kwargs(module),
            )
            pad_rank(delta, config.max_rank)
            if base_changing_init(config.init_lora_weights):
                delta.initialise_from_weight(module.weight, config.init_lora_weights)
                from_weight.append((module, delta))
            stacking = any(role == "replace" for _, role in attached_deltas(module))
            if config.use_dora and stacking:
                raise ValueError(
                    f"{name} already has a LoRA delta of another delta model: a DoRA delta "
                    "scales the whole layer's output, so it takes a layer of its own"
                )
            if config.use_dora:
                dora.append((module, delta))
            if stacking:
                # A second LoRA on the layer (another delta model's is fused into its forward)
                # adds its update to the output, as OpenDelta's did, under lora_1.
                delta.stacked = True
                self.insert_parallel_module(name, delta)
            else:
                self.replace_module(name, delta)
        for module, delta in from_weight:
            delta.subtract_initial(module)
        for module, delta in dora:
            delta.initialise_magnitude(module.weight, config.dora_dropout, config.dora_exact_norm)

    def _embedding_delta(self, name: str, module: nn.Embedding, rank: int) -> LoraEmbeddingDelta:
        config = self.config
        if any(role == "replace" for _, role in attached_deltas(module)):
            raise ValueError(
                f"{name} already has a LoRA delta of another delta model; an embedding takes one"
            )
        return LoraEmbeddingDelta(
            module.num_embeddings,
            module.embedding_dim,
            r=rank,
            alpha=pattern_value(config.alpha_pattern, name, config.lora_alpha),
            use_rslora=config.use_rslora,
            init=config.init_lora_weights,
            **self.factory_kwargs(module),
        )


def _lora_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) sizes of a layer LoRA modifies (an embedding: its vocabulary and width), or
    None for one it does not."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return linear_sizes(module)


def _check_patterns_match(patterns: dict | None, argument: str, targets: list[str]) -> None:
    """A rank_pattern / alpha_pattern key that matches no target is a typo that would silently
    leave every module at the default."""
    unmatched = [
        pattern
        for pattern in patterns or {}
        if not any(pattern_matches(pattern, name) for name in targets)
    ]
    if unmatched:
        shown = ", ".join(targets[:4]) + (f" and {len(targets) - 4} more" if targets[4:] else "")
        raise ValueError(
            f"{argument} key(s) {', '.join(map(repr, unmatched))} match none of the LoRA targets "
            f"({shown}); a key is a regex matching the end of a target's name at a dot, such as "
            "'value' or 'layer\\.1\\.attention\\.self\\.query': fix or remove it"
        )


def _linear_children_hint(module: nn.Module, name: str) -> str:
    linears = [child for child, sub in module.named_modules() if child and linear_sizes(sub)]
    if not linears:
        return "."
    return f" (inside {name}: " + ", ".join(linears[:6]) + ")."
