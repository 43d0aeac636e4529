"""First-use verification: a kernel variant is checked on its device before it is trusted.

No machine of this project runs the kernels on a GPU, so the first GPU to run one is a user's
(DESIGN.md, "Trusting kernels that no GPU here runs"). The first time a variant of a kernel
(`fastdelta.ops.variants`) runs on a device in a process, `fastdelta.ops.kernel_check` checks
its output and gradients against the torch reference on a small random problem of the same
variant. A mismatch, or a kernel that raises, warns once and moves the variant to the next
backend (triton, then cpp where the C++ extension is built and has kernels for the device, then
torch), forward and backward alike: a wrong kernel costs speed, never results. Verdicts are kept
on disk (`fastdelta.ops.verdicts`): a later process skips the variants known to be good and
still routes the known-bad ones away.

$FASTDELTA_VERIFY=1 checks on every device, 0 on none; unset, CUDA devices only. On CPU tensors
the triton backend runs under Triton's interpreter, whose results the test suite already checks
against the reference, and one check there costs seconds (an interpreted forward and backward),
which would slow every test that runs the kernels; so it is off there unless asked.

Once a variant is routed, a call's routing is one dictionary lookup. The forward routes (and
checks a variant's first use); the backward never checks: the eager autograd.Function hands it
the forward's backend, and the custom op's backward looks up the forward's route under the same
key, built from the same tensors and flags. Routes are never changed or removed in a process, so
the two agree, unless the forward ran unrouted (checks off, or inside a CUDA graph capture,
where nothing can be checked) and a later forward of the same variant routed it before this
backward ran.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import Counter

import torch

from fastdelta.ops.backend import unavailable_reason
from fastdelta.ops.variants import FIELDS, adapter_variant, describe, dora_variant, lora_variant
from fastdelta.ops.verdicts import verdict

ENVIRONMENT_VARIABLE = "FASTDELTA_VERIFY"
# Where a variant goes when its backend fails it.
NEXT_BACKENDS = {"triton": ("cpp", "torch"), "cpp": ("torch",)}


class KernelVerificationWarning(UserWarning):
    """A kernel variant failed its first-use check (or could not be checked)."""


_UNSET = object()
_mode: object | bool | None = _UNSET  # True: every device, False: none, None: CUDA only
# (requested backend, variant) -> the backend that runs it; appended to, never changed.
_routes: dict[tuple, str] = {}


def set_verification(enabled: bool | None) -> None:
    """Check first uses on every device (True), on none (False) or on CUDA devices only (None,
    the default); overrides $FASTDELTA_VERIFY for this process."""
    global _mode
    _mode = enabled


def verification_enabled(device: torch.device) -> bool:
    """Whether first uses on `device` are checked."""
    global _mode
    if _mode is _UNSET:
        _mode = _mode_from_environment()
    return _mode is True or (_mode is None and _is_cuda(device))


@functools.cache
def _is_cuda(device: torch.device) -> bool:
    # Cached: reading a device's type costs a quarter of a microsecond, on every call of an op.
    return device.type == "cuda"


def _mode_from_environment() -> bool | None:
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if value in ("0", "1"):
        return value == "1"
    if value:
        raise ValueError(
            f"${ENVIRONMENT_VARIABLE} must be 1 (check kernels on every device), 0 (check none) "
            f"or unset (check them on CUDA devices), got {value!r}"
        )
    return None


# --------------------------------------------------------------------------------------------
# Routes.


def lora_backend(requested, x, weight, has_bias, lora_A, seed, fan_in_fan_out, check=True) -> str:
    """The backend that runs this LoRA call: `requested`, or where its variant was moved. With
    `check`, a variant's first use is checked (a backward passes False: it follows its forward)."""
    if requested == "torch" or not may_route(x.device):
        return requested
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if m == 0:  # nothing to compute, no kernel to trust
        return requested
    n = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    variant = lora_variant(
        x.device, x.dtype, has_bias, seed is not None, fan_in_fan_out, n, k, lora_A.shape[0], m
    )
    return route(requested, variant, check)


def dora_backend(
    requested, x, weight, has_bias, lora_A, seed, fan_in_fan_out, keep_z, exact_norm, check=True
) -> str:
    """The backend that runs this DoRA call; see lora_backend. A DoRA variant is checked on its
    own: its kernels are LoRA's with other constants (the column scale, z kept)."""
    if requested == "torch" or not may_route(x.device):
        return requested
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if m == 0:
        return requested
    n = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    variant = dora_variant(
        x.device, x.dtype, has_bias, seed is not None, fan_in_fan_out, keep_z, exact_norm,
        n, k, lora_A.shape[0], m,
    )  # fmt: skip
    return route(requested, variant, check)


def adapter_backend(
    requested, h, down_weight, up_weight, has_down_bias, has_up_bias, activation, sequential,
    check=True,
) -> str:  # fmt: skip
    """The backend that runs this adapter call; see lora_backend."""
    if requested == "torch" or not may_route(h.device):
        return requested
    d_in = h.shape[-1]
    m = h.numel() // d_in if d_in else 0
    if m == 0:
        return requested
    variant = adapter_variant(
        h.device, h.dtype, has_down_bias, has_up_bias, activation, sequential,
        d_in, up_weight.shape[0], down_weight.shape[0], m,
    )  # fmt: skip
    return route(requested, variant, check)


def may_route(device: torch.device) -> bool:
    """Whether a call on `device` can be routed off its backend: not while no variant has a
    route and `device` is not checked (the CPU by default), so such a call skips building its
    variant (microseconds a call)."""
    return bool(_routes) or verification_enabled(device)


def route(requested: str, variant: tuple, check: bool = True) -> str:
    """The backend that runs `variant` when `requested` was chosen for it."""
    key = (requested, variant)
    name = _routes.get(key)
    if name is not None:
        return name
    device = variant[1]
    if not check or not verification_enabled(device) or _capturing(device):
        return requested
    name = _routes[key] = _first_trusted(requested, variant)
    return name


def _capturing(device: torch.device) -> bool:
    """Inside a CUDA graph capture nothing can be checked (a check reads results on the host)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _first_trusted(requested: str, variant: tuple) -> str:
    """The first backend from `requested` on that passes `variant`'s check; warns about the
    ones that fail."""
    device = variant[1]
    failed = []
    chosen = "torch"
    for name in (requested, *NEXT_BACKENDS.get(requested, ())):
        if name == "torch":
            break
        if name != requested and unavailable_reason(name, device, build=False) is not None:
            continue
        found = verdict(name, variant)
        if found.source == "unchecked":
            _warn(f"could not check the {name} kernels of {describe(variant)}: {found.error}")
        if found.passed:
            chosen = name
            break
        failed.append(found)
    for found in failed:
        cached = f" (the verdict is kept in {found.path}; delete it to check again)"
        _warn(
            f"the {found.backend} kernels of {describe(variant)} failed their first-use check "
            f"against the torch reference: {found.error}. This variant runs on the {chosen} "
            f"backend from now on{cached if found.path else ''}. Please report it, with the "
            f"output of `fastdelta doctor`; FASTDELTA_VERIFY=0 turns the checks off"
        )
    return chosen


def _warn(message: str) -> None:
    warnings.warn(f"fastdelta: {message}", KernelVerificationWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Reports.


def moved_variants() -> list[tuple[str, tuple, str]]:
    """(chosen backend, variant, the backend it runs on) of each variant moved in this process."""
    return [(asked, variant, name) for (asked, variant), name in _routes.items() if asked != name]


def moved_summary(requested: str, op: str, device: torch.device, **features) -> str:
    """`requested`, followed by where the moved variants of `op` on `device` with these
    `features` (variant fields) run: "triton (cpp for 2 variants that failed verification)"."""
    moved = Counter()
    for asked, variant, name in moved_variants():
        fields = dict(zip(FIELDS[variant[0]], variant, strict=True))
        matches = all(fields.get(field) == value for field, value in features.items())
        if asked == requested and variant[0] == op and variant[1] == device and matches:
            moved[name] += 1
    if not moved:
        return requested
    places = ", ".join(f"{name} for {count}" for name, count in sorted(moved.items()))
    plural = "s" if sum(moved.values()) > 1 else ""
    return f"{requested} ({places} variant{plural} that failed verification)"
