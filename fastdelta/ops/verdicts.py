"""Verdicts of first-use verification: kept in this process and on disk.

A verdict says whether a backend's kernels passed the check (`fastdelta.ops.kernel_check`) of
one variant (`fastdelta.ops.variants`). Verdicts are kept under $FASTDELTA_CACHE/verified/ (by
default ~/.cache/fastdelta/verified/), in a folder per environment: the device's name and
capability, the backend, its kernel sources (Triton's version and a hash of the kernels package,
or the C++ extension's build key) and torch's version; one JSON file per variant, written
atomically. A later process reads them instead of checking again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdelta.ops import kernel_check
from fastdelta.ops._extension import build_key, cache_root
from fastdelta.ops.backend import backend_module
from fastdelta.ops.variants import variant_fields
from fastdelta.version import __version__

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking backend `backend` on `variant`. source: "checked" (now), "cache"
    (read from `path`) or "unchecked" (the check could not run; the variant is trusted)."""

    backend: str
    variant: tuple
    passed: bool
    error: str | None
    source: str
    seconds: float = 0.0
    path: Path | None = None


_verdicts: dict[tuple, Verdict] = {}
_environments: dict[tuple, dict] = {}


def verdict(name: str, variant: tuple) -> Verdict:
    """Backend `name`'s verdict on `variant`: known in this process, read from the cache, or
    checked now."""
    found = _verdicts.get((name, variant))
    if found is None:
        found = _stored(name, variant) or check_variant(name, variant)
        _verdicts[(name, variant)] = found
    return found


def check_variant(name: str, variant: tuple) -> Verdict:
    """Check backend `name` on `variant` now, whatever is known of it, and keep the verdict."""
    start = time.perf_counter()
    try:
        error = kernel_check.check(backend_module(name), variant)
    except torch.OutOfMemoryError as exception:
        return Verdict(name, variant, True, f"out of memory ({exception})", "unchecked")
    except Exception as exception:  # a kernel that raises on a variant fails it, by name
        error = f"{type(exception).__name__}: {exception}"
    seconds = time.perf_counter() - start
    path = _verdict_path(name, variant)
    found = Verdict(name, variant, error is None, error, "checked", seconds, path)
    _store(found)
    _verdicts[(name, variant)] = found
    return found


def cache_directory() -> Path:
    """Where verdicts are kept: $FASTDELTA_CACHE/verified (by default ~/.cache/fastdelta/...)."""
    return cache_root() / "verified"


def environment(name: str, device: torch.device) -> dict[str, str]:
    """What a verdict of backend `name` on `device` holds for: the device's name and capability,
    the backend's kernel sources and torch's version."""
    key = (name, device)
    found = _environments.get(key)
    if found is None:
        found = _environments[key] = {
            "backend": name,
            "device": device_description(device),
            "sources": _sources(name),
            "torch": torch.__version__,
        }
    return found


def device_description(device: torch.device) -> str:
    """A GPU's name and compute capability ("NVIDIA H100 80GB HBM3 (sm_90)"), else the type."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return device.type


def _sources(name: str) -> str:
    if name == "triton":
        import triton

        from fastdelta import kernels

        interpreted = ", interpreted" if kernels.INTERPRETED else ""
        return f"triton {triton.__version__}, kernels {kernel_sources_hash()}{interpreted}"
    return f"fastdelta_C {build_key()}"


@functools.cache
def kernel_sources_hash() -> str:
    """A hash of the Triton kernels' sources (the fastdelta.kernels package's .py files)."""
    from fastdelta import kernels

    digest = hashlib.sha256()
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _verdict_path(name: str, variant: tuple) -> Path:
    # Two GPUs of one model share verdicts: the device's index is not part of the file's name.
    fields = variant_fields(variant) | {"device": variant[1].type}
    folder = _digest(environment(name, variant[1]))
    return cache_directory() / folder / f"{variant[0]}-{_digest(fields)}.json"


def _stored(name: str, variant: tuple) -> Verdict | None:
    path = _verdict_path(name, variant)
    try:
        record = json.loads(path.read_text())
        passed, error = record["passed"], record["error"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as problem:
        logger.warning("fastdelta: ignoring the unreadable verdict %s (%s)", path, problem)
        return None
    return Verdict(name, variant, bool(passed), error, "cache", 0.0, path)


def _store(found: Verdict) -> None:
    """Write the verdict's file atomically: a reader sees the whole file or none."""
    record = {
        "environment": environment(found.backend, found.variant[1]),
        "variant": variant_fields(found.variant),
        "passed": found.passed,
        "error": found.error,
        "seconds": round(found.seconds, 3),
        "fastdelta": __version__,
        "checked": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        found.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=found.path.parent, prefix=".", suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(record, file, indent=1)
        os.replace(temporary, found.path)
    except OSError as problem:
        logger.warning(
            "fastdelta: could not keep the verdict in %s (%s); the next process checks again",
            found.path,
            problem,
        )
