"""Input and output feature sizes of the modules a delta is attached to.

Linear, Conv1D, embedding and norm layers say their sizes; for any other module (an attention
block, a feed-forward block) the sizes are read off one pseudo forward pass of the backbone:
its `dummy_inputs` when it has them, else a small integer tensor, as OpenDelta did. The pass
runs under `torch.no_grad()` in eval mode (no dropout, no running-statistics updates), and a
failure is raised, naming the modules and the input tried.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastdelta.injection import first_input_name, original_class

FALLBACK_PSEUDO_INPUT = [[0, 0, 0]]

Sizes = tuple[int | None, int]  # (input features or None for integer inputs, output features)


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' Conv1D (GPT-2): a linear layer with weight [in, out]."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def plain_linear_layout(module: nn.Module) -> bool | None:
    """fan_in_fan_out of a linear layer that computes x W^T + b with its class's own forward:
    False for an nn.Linear, True for a Conv1D (weight [in, out]); None for any other module,
    a subclass with a forward of its own (a quantized linear) included."""
    cls = original_class(module)
    if isinstance(module, nn.Linear):
        return False if cls.forward is nn.Linear.forward else None
    if is_conv1d(module):
        plain = next(base.forward for base in cls.__mro__ if base.__name__ == "Conv1D")
        return True if cls.forward is plain else None
    return None


def linear_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def static_sizes(module: nn.Module) -> Sizes | None:
    """Sizes a module's type tells without running it, or None."""
    sizes = linear_sizes(module)
    if sizes is not None:
        return sizes
    if isinstance(module, nn.Embedding):
        return None, module.embedding_dim
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.normalized_shape:
        return module.normalized_shape[-1], module.normalized_shape[-1]
    own = dict(module.named_parameters(recurse=False))
    # Norm layers of transformers models (T5LayerNorm, LlamaRMSNorm, ...): one 1-D scale.
    if type(module).__name__.endswith("Norm") and not any(True for _ in module.children()):
        weight = own.get("weight")
        if weight is not None and weight.dim() == 1 and set(own) <= {"weight", "bias"}:
            return weight.shape[0], weight.shape[0]
    return None


def module_sizes(backbone: nn.Module, names: Sequence[str]) -> dict[str, Sizes]:
    """Sizes of the named modules of `backbone`, running a pseudo forward only if needed."""
    modules = {name: backbone.get_submodule(name) for name in names}
    sizes = {name: static_sizes(module) for name, module in modules.items()}
    unknown = [name for name, value in sizes.items() if value is None]
    if unknown:
        sizes.update(
            _sizes_from_pseudo_forward(backbone, {name: modules[name] for name in unknown})
        )
    return sizes


def _sizes_from_pseudo_forward(backbone: nn.Module, modules: dict[str, nn.Module]):
    seen: dict[str, Sizes] = {}

    def recorder(name):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs.get(first_input_name(type(module).forward))
            main = output[0] if isinstance(output, (tuple, list)) else output
            if name not in seen and isinstance(main, torch.Tensor):
                floating = isinstance(hidden, torch.Tensor) and torch.is_floating_point(hidden)
                in_features = hidden.shape[-1] if floating else None
                seen[name] = (in_features, main.shape[-1])

        return hook

    handles = [
        module.register_forward_hook(recorder(name), with_kwargs=True)
        for name, module in modules.items()
    ]
    try:
        described = run_pseudo_forward(
            backbone,
            list(modules),
            f"finds the feature sizes of {', '.join(modules)}",
            "target modules whose sizes are known without a forward (Linear, Conv1D, norms)",
        )
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in seen]
    if missing:
        raise RuntimeError(
            f"The pseudo forward pass of {type(backbone).__name__} on {described} never called "
            f"{', '.join(missing)} with a tensor input and output, so their feature sizes are "
            "unknown; target modules that the forward pass reaches."
        )
    return seen


def run_pseudo_forward(backbone: nn.Module, names: list[str], purpose: str, fix: str) -> str:
    """Run the forward of `backbone` (of its base model when the modules `names` are all inside
    it) once on its pseudo input, without gradients and in eval mode, restoring each module's
    mode after; returns the input, described. A backbone without `dummy_inputs` that holds
    models with them (a user's module wrapping pretrained models, which may have no forward of
    its own) runs those models on theirs instead, each for the modules inside it, as OpenDelta
    did; the modules inside none of them run with the backbone. A failure is raised saying what
    the pass was for (`purpose`, "finds ...") and, besides giving the backbone `dummy_inputs`,
    `fix`."""
    own = getattr(backbone, "dummy_inputs", None)
    inner = [] if own is not None else _models_with_dummy_inputs(backbone)
    groups: dict[str, list[str]] = {}
    for name in names:
        prefix = next((p for p, _ in inner if name.startswith(p + ".") or name == p), "")
        groups.setdefault(prefix, []).append(name)
    described = []
    for prefix, group in groups.items():
        module = backbone.get_submodule(prefix) if prefix else backbone
        inside = [name[len(prefix) + 1 :] if prefix else name for name in group]
        described.append(_run_one_pseudo_forward(module, inside, purpose, fix))
    return ", ".join(described)


def _models_with_dummy_inputs(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each outermost submodule of `backbone` that has `dummy_inputs`."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in backbone.named_modules():
        inside_found = any(name.startswith(prefix + ".") for prefix, _ in found)
        if name and not inside_found and getattr(module, "dummy_inputs", None) is not None:
            found.append((name, module))
    return found


def _run_one_pseudo_forward(backbone: nn.Module, names: list[str], purpose: str, fix: str) -> str:
    runner = _smallest_runner(backbone, names)
    pseudo_input = getattr(runner, "dummy_inputs", None)
    if pseudo_input is None:
        pseudo_input = torch.tensor(FALLBACK_PSEUDO_INPUT)
    pseudo_input = _to_device(pseudo_input, _device_of(backbone))
    training = {module: module.training for module in runner.modules()}
    described = _describe(pseudo_input)
    try:
        runner.eval()
        with torch.no_grad():
            if isinstance(pseudo_input, dict):
                runner(**pseudo_input)
            else:
                runner(pseudo_input)
    except Exception as error:
        raise RuntimeError(
            f"The pseudo forward pass of {type(runner).__name__} that {purpose} failed on the "
            f"input {described}: {error}. Give the backbone a `dummy_inputs` attribute (a dict "
            f"of keyword inputs its forward accepts), or {fix}."
        ) from error
    finally:
        for module, mode in training.items():
            module.training = mode
    return described


def _smallest_runner(backbone: nn.Module, names: list[str]) -> nn.Module:
    """The backbone's base model when every module is inside it (its dummy inputs fit it best,
    and a task head's own input checks do not apply), else the backbone itself."""
    prefix = getattr(backbone, "base_model_prefix", "")
    base = getattr(backbone, prefix, None) if prefix else None
    if (
        isinstance(base, nn.Module)
        and base is not backbone
        and all(name.startswith(prefix + ".") for name in names)
    ):
        return base
    return backbone


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() <= 16 and not value.is_meta:
            return f"tensor{value.tolist()}"
        return f"tensor{list(value.shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_describe(item)}" for key, item in value.items()) + "}"
    return repr(value)
