"""What every delta module shares, and how to tell delta parameters from the backbone's own."""

from __future__ import annotations

from torch import nn


class DeltaLayer(nn.Module):
    """Base class of every delta module that fastdelta attaches to a backbone.

    A delta is registered as a child of the module it modifies (its host) under `delta_name`,
    so its parameters are named `<host>.<delta_name>.<param>` (`...query.lora.lora_A`) and the
    host's own parameter names never change.

    `role` says how the host's forward uses it:
    - "replace": `replace_forward(host, *args, **kwargs)` computes the host's output;
    - "parallel": `forward(host_input, host_output)` returns the new output;
    - "after": `forward(host_output)` returns the new output;
    - "before": `forward(host_input)` returns the new input;
    - None: it takes no part in the forward (it only trains some of the host's own parameters,
      named in `host_parameter_names`, as BitFit does with existing biases).
    """

    delta_name: str = ""
    role: str | None = None
    host_parameter_names: tuple[str, ...] = ()

    def backend_name(self) -> str:
        """The compute backend this delta's forward runs on (shown by `log()`)."""
        return "torch"


def delta_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the parameters of `model` that belong to deltas.

    These are the parameters of every `DeltaLayer` inside `model`, plus the host parameters a
    delta trains in place (BitFit's unfrozen existing biases).
    """
    names = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, DeltaLayer):
            continue
        prefix = module_name + "." if module_name else ""
        names.update(prefix + name for name, _ in module.named_parameters(remove_duplicate=False))
        host_prefix = module_name.rpartition(".")[0]
        host_prefix = host_prefix + "." if host_prefix else ""
        names.update(host_prefix + name for name in module.host_parameter_names)
    return names
