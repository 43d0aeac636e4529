"""The one place that decides which compute backend runs a fused op.

`auto` (the default) picks the fastest backend available for the tensor's device: triton on a
recent CUDA GPU, else cpp once the C++ extension is built (on the CPU too, where it beats the
torch backend), else torch; `FASTDELTA_BACKEND` or `set_backend()` force one. A forced backend
that cannot run raises; an automatic choice never does, and never builds the C++ extension
(that takes minutes): it uses the cpp backend only once the extension is built, and on a GPU
otherwise warns, once, with the command that builds it (`fastdelta build-ext`).

The functional ops resolve the backend once per call, before the op runs, and pass its name to
the forward and the backward alike, so a set_backend() between them cannot split a step over two
backends (whose dropout masks differ). The answer depends only on the setting, the device and the
dtype, so it is computed once and cached; under torch.compile it is a constant of the graph
(`torch.compiler.assume_constant_result`), guarded on the setting: dynamo traces `get_backend()`,
so a set_backend() recompiles. $FASTDELTA_BACKEND is read once, when fastdelta is imported
(reading the environment costs most of a microsecond, which a call on small inputs would feel);
set it before, or call set_backend().
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cpp", "torch")
ENVIRONMENT_VARIABLE = "FASTDELTA_BACKEND"

_setting: str | None = None
# $FASTDELTA_BACKEND's setting, once the first op has read it.
_environment: str | None = None


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
    # What can run may have changed (forcing cpp builds the extension, which auto then uses).
    _resolved.clear()


def get_backend() -> str:
    """The backend setting: set_backend's, else $FASTDELTA_BACKEND's, else "auto"."""
    if _setting is not None:
        return _setting
    return _environment or _read_environment()


def _read_environment() -> str:
    global _environment
    _environment = _check_name(
        os.environ.get(ENVIRONMENT_VARIABLE, "auto"), f"${ENVIRONMENT_VARIABLE}"
    )
    return _environment


# Read at import, so the first compiled graph already sees the value its guard will keep (read
# inside the first traced call, it would change under that guard: one recompile). A bad value
# is left for the first op to raise, not the import.
with contextlib.suppress(ValueError):
    _read_environment()


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


def _cpp_reason(device: torch.device | None, build: bool) -> str | None:
    from fastdelta.ops import _extension

    reason = _extension.unavailable_reason() if build else _extension.unbuilt_reason()
    if reason or device is None or device.type == "cpu":
        return reason
    if device.type != "cuda":
        return f"the C++ extension has no kernels for {device.type} tensors"
    return _extension.cuda_kernels_reason()


def unavailable_reason(
    name: str, device: torch.device | str | None = None, *, build: bool = True
) -> str | None:
    """Why backend `name` cannot run (on `device`, when given) in this process; None if it can.
    Asking about "cpp" the first time builds (minutes, once, into a cache directory) or loads
    the C++ extension; with `build=False` it only loads a build that exists."""
    _check_name(name, "unavailable_reason")
    device = None if device is None else torch.device(device)
    if name in ("torch", "auto"):
        return None
    if name == "triton":
        return _triton_reason(device)
    return _cpp_reason(device, build)


_logged_fallbacks: set[str] = set()


def _report_fallback(device: torch.device, dtype: torch.dtype | None, reason: str) -> None:
    """Say once per process and reason why the automatic choice runs `device`'s tensors on the
    torch backend: a warning where Triton cannot run at all (the fused kernels are then one
    build away), a log line where only the dtype keeps Triton out."""
    if reason in _logged_fallbacks:
        return
    _logged_fallbacks.add(reason)
    triton_reason = unavailable_reason("triton", device)
    if triton_reason is None:
        logger.info(
            "fastdelta: %s tensors on %s run on the torch backend (Triton's kernels take float16, "
            "bfloat16 and float32); the cpp backend would run them: %s",
            dtype,
            device,
            reason,
        )
        return
    warnings.warn(
        f"fastdelta: the fused kernels cannot run on {device.type} tensors here, so the slower "
        f"torch backend runs them. Triton: {triton_reason}. The cpp backend: {reason}",
        stacklevel=2,
    )


# (setting, device, dtype) -> backend name: what resolve_backend answered before.
_resolved: dict[tuple, str] = {}


def resolve_backend(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend that runs an op on tensors of `dtype` on `device` under the current setting.
    Cheap: after the first call for a (setting, device, dtype), a dictionary lookup (in eager
    mode without even the constant-result wrapper, which costs a microsecond a call)."""
    setting = get_backend()
    if not torch.compiler.is_compiling():
        name = _resolved.get((setting, device, dtype))
        if name is not None:
            return name
    return _resolve(setting, device, dtype)


@torch.compiler.assume_constant_result
def _resolve(setting: str, device: torch.device | str, dtype: torch.dtype | None) -> str:
    key = (setting, device, dtype)
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _choose(setting, torch.device(device), dtype)
    return name


def _choose(setting: str, device: torch.device, dtype: torch.dtype | None) -> str:
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
        # Never a build here: that would be minutes inside a forward, unannounced.
        reason = unavailable_reason("cpp", device, build=False)
        if reason is None:
            return "cpp"
        _report_fallback(device, dtype, reason)
    elif device.type == "cpu" and unavailable_reason("cpp", device, build=False) is None:
        # The CPU's fastest path once built: one call into C++ per forward and backward (a
        # fraction of the host time of the torch backend's dozen op calls on small inputs)
        # and a vectorised dropout hash fused into its copies of x (benchmarks/results/cpu.md).
        return "cpp"
    return "torch"


def op_gradients(grads, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A backward custom op's outputs from a backend's gradients: each contiguous, an empty
    tensor (like `like`) for one not computed, since a custom op returns tensors, not None."""
    return tuple(like.new_empty(0) if g is None else g.contiguous() for g in grads)


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
