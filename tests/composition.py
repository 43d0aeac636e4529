"""Helpers for tests with several delta models on one backbone (test_composition*.py)."""

from __future__ import annotations

import torch
from tiny_models import first_output, tiny_inputs
from torch import nn

from fastdelta import AdapterModel, BitFitModel, LoraModel, ParallelAdapterModel

DELTA_CLASSES = {
    "lora": LoraModel,
    "adapter": AdapterModel,
    "parallel_adapter": ParallelAdapterModel,
    "bitfit": BitFitModel,
}
# The first transformer layer of each base model (a scope for detach(module=...)).
FIRST_LAYER = {
    "bert": "encoder.layer.0",
    "gpt2": "h.0",
    "llama": "layers.0",
    "t5": "encoder.block.0",
}


@torch.no_grad()
def output(model: nn.Module, architecture: str, kind: str = "base") -> torch.Tensor:
    return first_output(model(**tiny_inputs(architecture, kind)))


def owned_by_host(delta_model) -> dict[str, dict[str, nn.Parameter]]:
    """host name -> {parameter name in the backbone: parameter} of `delta_model`'s deltas, with
    the host biases BitFit trains in place: what its checkpoint holds besides a head."""
    backbone = delta_model.backbone_model
    owned: dict[str, dict[str, nn.Parameter]] = {}
    for attachment in delta_model.attachments:
        host = backbone.get_submodule(attachment.host_name)
        parameters = owned.setdefault(attachment.host_name, {})
        for name, parameter in attachment.delta.named_parameters():
            parameters[f"{attachment.host_name}.{attachment.delta_name}.{name}"] = parameter
        for name in attachment.delta.host_parameter_names:
            parameters[f"{attachment.host_name}.{name}"] = host.get_parameter(name)
    return owned


def owned_parameters(delta_model) -> dict[str, nn.Parameter]:
    """The parameters of `delta_model`'s deltas by their names in the backbone."""
    return {
        name: p for by_name in owned_by_host(delta_model).values() for name, p in by_name.items()
    }


@torch.no_grad()
def randomize(parameters: dict[str, nn.Parameter], seed: int, std: float = 0.1) -> None:
    """Nudge each parameter as training would (LoRA's B and BitFit's added biases start at zero,
    so untrained deltas would change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in parameters.values():
        parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * std)


def trained(delta_type: str, backbone: nn.Module, seed: int, **arguments):
    """A delta model of `delta_type` on `backbone`, frozen as for training, its deltas nudged."""
    delta_model = DELTA_CLASSES[delta_type](backbone, **arguments)
    delta_model.freeze_module()
    randomize(owned_parameters(delta_model), seed)
    return delta_model
