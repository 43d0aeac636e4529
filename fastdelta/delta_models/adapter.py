"""AdapterModel (sequential) and ParallelAdapterModel: bottleneck adapters on target modules."""

from __future__ import annotations

import torch
from torch import nn

from fastdelta.addressing import ModuleAddresses
from fastdelta.delta_models.base import DeltaBase, config_arguments
from fastdelta.delta_models.config import AdapterConfig, ParallelAdapterConfig
from fastdelta.layers.adapter import AdapterDelta, InputTap, SpanningAdapterDelta
from fastdelta.ops.activations import canonical_activation


class AdapterModel(DeltaBase):
    """Houlsby-style adapters after each target: h + up(act(down(h))), h the target's output
    (its first item when the target returns a tuple)."""

    config_class = AdapterConfig
    default_modified_modules = ("attn@.proj@", "ff@.w2@")

    def __init__(
        self,
        backbone_model: nn.Module,
        bottleneck_dim: int = 24,
        non_linearity: str = "gelu_new",
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        common_structure: bool = False,
        interactive_modify: bool | int = False,
        backend: str = "hf",
        *,
        delta_dtype: torch.dtype | str | None = None,
        name: str = "default",
    ):
        super().__init__(backbone_model, self.config_class(**config_arguments(locals())))

    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        sizes = self.target_sizes(targets)
        for name in targets:
            _, features = sizes[name]
            delta = AdapterDelta(
                features,
                features,
                self.config.bottleneck_dim,
                canonical_activation(self.config.non_linearity),
                delta_name="adapter",
                **self.factory_kwargs(self.backbone_model.get_submodule(name)),
            )
            self.insert_sequential_module(name, delta)


class ParallelAdapterModel(DeltaBase):
    """Parallel adapters (He et al., 2022), as OpenDelta builds them: `modified_modules` is a
    list of pairs [input_0, output_0, input_1, output_1, ...]. The i-th module an input entry
    selects is paired with the i-th module its output entry selects (in model order); each pair
    gets one adapter adding scaled * up(act(down(x))) to the output module's output, x the input
    module's input. A pair of one module (["attn@", "attn@"]) spans that module alone."""

    config_class = ParallelAdapterConfig
    default_modified_modules = ("attn@", "attn@", "ff@.w1@", "ff@.w2@")

    def __init__(
        self,
        backbone_model: nn.Module,
        bottleneck_dim: int = 24,
        non_linearity: str = "gelu_new",
        scaled: float = 1.0,
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        common_structure: bool = False,
        interactive_modify: bool | int = False,
        backend: str = "hf",
        *,
        delta_dtype: torch.dtype | str | None = None,
        name: str = "default",
    ):
        super().__init__(backbone_model, self.config_class(**config_arguments(locals())))

    def _targets(self) -> list[tuple[str, str]]:
        """The (input module, output module) pairs that modified_modules select."""
        given = self.config.modified_modules
        entries = list(self.default_modified_modules if given is None else given)
        if len(entries) % 2:
            raise ValueError(
                f"ParallelAdapterModel reads modified_modules as (input module, output module) "
                f"pairs, as OpenDelta does, but {entries} has an odd number of entries: name "
                'each module twice for an adapter across it (["attn@", "attn@"]), or give the '
                "module whose input the adapter reads and the one whose output it adds to "
                '(["intermediate.dense", "output.dense"])'
            )
        selected = super()._targets()  # checks the entries and says which match nothing
        addresses = ModuleAddresses(self.backbone_model)
        order = {name: index for index, name in enumerate(addresses.modules)}
        pairs = []
        for first, second in zip(entries[::2], entries[1::2], strict=True):
            inputs = [name for name in selected if addresses.matches(name, first)]
            outputs = [name for name in selected if addresses.matches(name, second)]
            pairs.extend(_paired(first, inputs, second, outputs, order))
        return pairs

    def add_all_delta_to_backbone(self, targets: list[tuple[str, str]]) -> None:
        names = list(dict.fromkeys(name for pair in targets for name in pair))
        sizes = self.target_sizes(names)
        integer_input = [source for source, _ in targets if sizes[source][0] is None]
        if integer_input:
            raise TypeError(
                f"A parallel adapter reads its input module's floating-point input, but "
                f"{', '.join(dict.fromkeys(integer_input))} take integer inputs (token ids); "
                "target modules inside the network instead"
            )
        for source, target in targets:
            arguments = (
                sizes[source][0],
                sizes[target][1],
                self.config.bottleneck_dim,
                canonical_activation(self.config.non_linearity),
            )
            options = {
                "scaling": self.config.scaled,
                "delta_name": "parallel_adapter",
                **self.factory_kwargs(self.backbone_model.get_submodule(target)),
            }
            if source == target:
                self.insert_parallel_module(target, AdapterDelta(*arguments, **options))
                continue
            tap = InputTap(source)
            delta = SpanningAdapterDelta(tap, target, *arguments, **options)
            self.insert_spanning_module(source, tap, target, delta, "parallel_adapter")


def _paired(
    first: str, inputs: list[str], second: str, outputs: list[str], order: dict[str, int]
) -> list[tuple[str, str]]:
    """The i-th of `inputs` with the i-th of `outputs` (the modules entries `first` and
    `second` select), each input module at or before its output module in model order."""
    if len(inputs) != len(outputs):
        raise ValueError(
            f"The parallel adapter pair ({first!r}, {second!r}) of modified_modules pairs the "
            f"modules each entry selects in model order, but {first!r} selects {len(inputs)} "
            f"and {second!r} selects {len(outputs)}: name entries that select as many modules "
            "each (exclude_modules may drop some)"
        )
    backwards = [(a, b) for a, b in zip(inputs, outputs, strict=True) if order[a] > order[b]]
    if backwards:
        source, target = backwards[0]
        raise ValueError(
            f"The parallel adapter pair ({first!r}, {second!r}) of modified_modules would read "
            f"the input of {source} and add to the output of {target}, which comes before it "
            "in model order: give the module whose input the adapter reads first in each pair"
        )
    return list(zip(inputs, outputs, strict=True))
