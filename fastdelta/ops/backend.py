"""The one place that decides which compute backend runs a fused op.

`auto` (the default) picks, per call, the fastest backend available for the tensor's device;
`FASTDELTA_BACKEND` or `set_backend()` force one. A forced backend that cannot run raises; an
automatic choice never does (it logs, once, why it passed over the cpp backend).
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

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


# The dtypes each backend computes in; an automatic choice falls back to torch for the others.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton's kernels here use bf16 tensor cores and are tuned for Ampere and Hopper.
TRITON_MIN_CAPABILITY = (8, 0)


def _triton_reason(device: torch.device | None) -> str | None:
    try:
        from fastdelta import kernels
    except ImportError as error:
        return f"Triton does not import ({error}); install it with `pip install triton`"
    if device is None or device.type == "cpu":
        if kernels.INTERPRETED:
            return None
        if device is None and torch.cuda.is_available():
            return None
        return (
            "Triton runs on CUDA tensors; to run its kernels on the CPU, set TRITON_INTERPRET=1 "
            "before fastdelta is imported"
        )
    if device.type != "cuda":
        return f"Triton has no kernels for {device.type} tensors"
    if kernels.INTERPRETED:
        return "TRITON_INTERPRET=1 is set, so Triton's kernels only run on CPU tensors"
    capability = torch.cuda.get_device_capability(device)
    if capability < TRITON_MIN_CAPABILITY:
        return (
            f"the GPU's compute capability {capability} is below the "
            f"{TRITON_MIN_CAPABILITY} that fastdelta's Triton kernels need"
        )
    return None


def _cpp_reason(device: torch.device | None) -> str | None:
    # The first ask builds (once, into a cache directory) or loads the extension.
    from fastdelta.ops import _extension

    reason = _extension.unavailable_reason()
    if reason or device is None or device.type == "cpu":
        return reason
    if device.type != "cuda":
        return f"the C++ extension has no kernels for {device.type} tensors"
    return _extension.cuda_kernels_reason()


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend `name` cannot run (on `device`, when given) in this process; None if it can.
    Asking about "cpp" the first time builds or loads the C++ extension."""
    _check_name(name, "unavailable_reason")
    device = None if device is None else torch.device(device)
    if name in ("torch", "auto"):
        return None
    if name == "triton":
        return _triton_reason(device)
    return _cpp_reason(device)


_logged_fallbacks: set[str] = set()


def _log_fallback(device: torch.device, reason: str) -> None:
    """Say once per process and reason why the automatic choice passed over the cpp backend."""
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        logger.info("fastdelta: not using the cpp backend on %s tensors: %s", device.type, reason)


def resolve_backend(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend that runs an op on tensors of `dtype` on `device` under the current setting."""
    device = torch.device(device)
    setting = get_backend()
    if setting != "auto":
        reason = unavailable_reason(setting, device)
        if reason is None and setting == "triton" and dtype not in (None, *TRITON_DTYPES):
            reason = f"its kernels compute in float16, bfloat16 or float32, not {dtype}"
        if reason:
            raise RuntimeError(
                f"The {setting!r} backend cannot run on {device.type} tensors here: {reason}. "
                f"Choose another with fastdelta.set_backend(...) or ${ENVIRONMENT_VARIABLE} "
                '(or "auto")'
            )
        return setting
    if device.type == "cuda":
        if dtype in (None, *TRITON_DTYPES) and unavailable_reason("triton", device) is None:
            return "triton"
        reason = unavailable_reason("cpp", device)
        if reason is None:
            return "cpp"
        _log_fallback(device, reason)
    return "torch"


def backend_module(name: str):
    """The module that implements the ops for backend `name` (lora_forward, lora_backward, ...)."""
    if name == "triton":
        from fastdelta import kernels

        return kernels
    if name == "cpp":
        from fastdelta.ops import _extension, cpp_backend

        _extension.require()
        return cpp_backend
    from fastdelta.ops import torch_backend

    return torch_backend
