"""OpenDelta's `opendelta.utils.inspect`: parameter statistics of a module and of an optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastdelta.layers.base import delta_parameter_names


def inspect_module_statistics(module: nn.Module, verbose: bool = True) -> dict[str, Any]:
    """The parameter statistics of `module` (a backbone with deltas), as OpenDelta computes
    them: `total_parameters`, `trainable_parameters`, `trainable_ratio`, `delta_parameters`
    (every delta attached inside `module`, whichever delta model attached it, BitFit's trained
    biases included), `delta_ratio`, and `cudamem` / `maxcudamem`, the CUDA memory allocated now
    and at its peak on all devices, in GiB (0 without CUDA). Each shared parameter counts once.
    Printed when `verbose`."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            "inspect_module_statistics takes the model (a torch.nn.Module) to count, got "
            f"{type(module).__name__}"
        )
    deltas = delta_parameter_names(module)
    counted: dict[int, tuple[int, bool, bool]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        numel, trainable, delta = counted.get(id(parameter), (parameter.numel(), False, False))
        counted[id(parameter)] = (numel, parameter.requires_grad, delta or name in deltas)
    total = sum(numel for numel, _, _ in counted.values())
    trainable = sum(numel for numel, requires_grad, _ in counted.values() if requires_grad)
    delta = sum(numel for numel, _, is_delta in counted.values() if is_delta)
    stat = {
        "total_parameters": total,
        "trainable_parameters": trainable,
        "trainable_ratio": trainable / total if total else 0.0,
        "delta_parameters": delta,
        "delta_ratio": delta / total if total else 0.0,
        "cudamem": _cuda_gib(torch.cuda.memory_allocated),
        "maxcudamem": _cuda_gib(torch.cuda.max_memory_allocated),
    }
    if verbose:
        print(stat)
    return stat


def _cuda_gib(measure) -> float:
    """`measure` (bytes) summed over the CUDA devices, in GiB."""
    if not torch.cuda.is_available():
        return 0.0
    return sum(measure(f"cuda:{index}") for index in range(torch.cuda.device_count())) / 2**30


def inspect_optimizer_statistics(optimizer: torch.optim.Optimizer, verbose: bool = True) -> dict:
    """The statistics of each parameter group of `optimizer`: `total_parameters`,
    `trainable_parameters`, `trainable_ratio` (a percentage string such as "1.234567%") and the
    group's other settings (lr, weight_decay, ...), printed as
    `optimizer info: {"param_group_0": {...}, ...}` when `verbose`. Returns the statistics of the
    last group, as OpenDelta does (one group's, for the usual optimizer of one group)."""
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not groups:
        raise TypeError(
            "inspect_optimizer_statistics takes a torch.optim.Optimizer (with param_groups), got "
            f"{type(optimizer).__name__}"
        )
    stats = {}
    for index, group in enumerate(groups):
        sizes = [(parameter.numel(), parameter.requires_grad) for parameter in group["params"]]
        total = sum(numel for numel, _ in sizes)
        trainable = sum(numel for numel, requires_grad in sizes if requires_grad)
        stat = {
            "total_parameters": total,
            "trainable_parameters": trainable,
            "trainable_ratio": f"{100 * trainable / total if total else 0.0:.6f}%",
        }
        stat.update((key, value) for key, value in group.items() if key != "params")
        stats[f"param_group_{index}"] = stat
    if verbose:
        print(f"optimizer info: {stats}")
    return stats[f"param_group_{len(groups) - 1}"]
