"""The one place that decides which compute backend runs a fused op.

`auto` (the default) picks, per call, the fastest backend available for the tensor's device;
`FASTDELTA_BACKEND` or `set_backend()` force one. A forced backend that cannot run raises; an
automatic choice never does.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")
ENVIRONMENT_VARIABLE = "FASTDELTA_BACKEND"

_setting: str | None = None


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"Unknown fastdelta backend {name!r} (from {source}); "
            f"choose one of {', '.join(BACKENDS)}"
        )
    return name


def set_backend(name: str) -> None:
    """Force the backend of every fused op: "auto", "triton", "cpp" or "torch"."""
    global _setting
    _check_name(name, "set_backend")
    if name != "auto":
        reason = unavailable_reason(name)
        if reason:
            raise RuntimeError(f"The {name!r} backend cannot run here: {reason}")
    _setting = name


def get_backend() -> str:
    """The backend setting: set_backend's, else $FASTDELTA_BACKEND's, else "auto"."""
    if _setting is not None:
        return _setting
    return _check_name(os.environ.get(ENVIRONMENT_VARIABLE, "auto"), f"${ENVIRONMENT_VARIABLE}")


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run in this process, or None when it can."""
    if name == "torch":
        return None
    return f"this fastdelta build has no {name} implementation of its ops yet"


def resolve_backend(device: torch.device | str) -> str:
    """The backend that runs an op on tensors on `device` under the current setting."""
    setting = get_backend()
    if setting != "auto":
        reason = unavailable_reason(setting)
        if reason:
            raise RuntimeError(f"The {setting!r} backend cannot run here: {reason}")
        return setting
    return "torch"
