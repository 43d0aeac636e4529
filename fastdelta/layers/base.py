"""What every delta module shares, and how to tell delta parameters from the backbone's own."""

from __future__ import annotations

from torch import nn

# Attribute, in a host module's __dict__, holding the (delta name, role) of each delta attached
# to it, in the order they were attached. Kept as a tuple of strings so that deepcopy and
# DataParallel's shallow __dict__ copy of a replica both carry it correctly.
ATTACHED_DELTAS = "_fastdelta_deltas"


class DeltaLayer(nn.Module):
    """Base class of fastdelta's delta modules.

    A delta is registered as a child of the module it modifies (its host) under its
    `delta_name`, so its parameters are named `<host>.<delta_name>.<param>`
    (`...query.lora.lora_A`) and the host's own parameter names never change. How the host's
    forward uses it depends on how it was attached (see `fastdelta.injection`).
    `host_parameter_names` lists host parameters the delta trains in place (BitFit's existing
    biases); they count as delta parameters.
    """

    delta_name: str = "delta"
    host_parameter_names: tuple[str, ...] = ()

    def on_detach(self, host: nn.Module) -> None:
        """Called after the delta is taken off `host`."""

    def on_attach(self, host: nn.Module) -> None:
        """Called after the delta is put back on `host` by `attach()`."""

    def backend_name(self) -> str:
        """The compute backend this delta runs on (shown by `log()`)."""
        return "torch"


_MISSING = object()


def parameter(module: nn.Module, name: str):
    """`module.<name>`, read from its parameter dictionary when it is a registered parameter (or
    a registered None): nn.Module's attribute lookup of a parameter costs half a microsecond
    (torch 2.13, one CPU thread), several a call for a layer that reads four; any other
    attribute the usual way (a buffer, a property, or the plain attribute a DataParallel
    replica holds its parameters in)."""
    value = module._parameters.get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


def linear_parameters(host: nn.Module) -> tuple:
    """(weight, bias) of a linear host, read from its parameter dictionary in one go (see
    `parameter`): bias None where the layer has none."""
    own = host._parameters
    if "weight" in own:
        return own["weight"], own.get("bias")
    return parameter(host, "weight"), parameter(host, "bias")


def attached_deltas(host: nn.Module) -> tuple[tuple[str, str | None], ...]:
    """(delta name, role) of each delta attached to `host`."""
    return host.__dict__.get(ATTACHED_DELTAS, ())


def delta_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the parameters of `model` that belong to deltas.

    These are the parameters of every delta attached inside `model`, plus the host parameters
    a delta trains in place (BitFit's unfrozen existing biases).
    """
    names = set()
    for host_name, host in model.named_modules():
        prefix = host_name + "." if host_name else ""
        for delta_name, _ in attached_deltas(host):
            delta = host._modules[delta_name]
            names.update(
                f"{prefix}{delta_name}.{name}"
                for name, _ in delta.named_parameters(remove_duplicate=False)
            )
            names.update(prefix + name for name in getattr(delta, "host_parameter_names", ()))
    return names
