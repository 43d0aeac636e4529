"""What the doctor reports of the machine: versions, settings, devices and backends."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import warnings

import torch

from fastdelta import ops
from fastdelta.ops import backend as backend_selection
from fastdelta.ops import cpp_backend
from fastdelta.ops.verdicts import cache_directory
from fastdelta.version import __version__


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    result = subprocess.run(query, capture_output=True, text=True, check=False, timeout=30)
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 else None


def versions() -> dict[str, str | None]:
    return {
        "fastdelta": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvidia_driver": _nvidia_driver(),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
    }


def settings() -> dict[str, str | None]:
    names = ("FASTDELTA_BACKEND", "FASTDELTA_VERIFY", "FASTDELTA_CACHE", "TRITON_INTERPRET")
    return {name: os.environ.get(name) for name in names} | {
        "cache_directory": str(cache_directory())
    }


def devices() -> list[dict]:
    """The CPU and each CUDA GPU, with what a bug report needs of them."""
    found = [
        {
            "device": "cpu",
            "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
    ]
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        found.append(
            {
                "device": f"cuda:{index}",
                "name": properties.name,
                "capability": f"{properties.major}.{properties.minor}",
                "memory_gib": round(properties.total_memory / 2**30, 1),
                "multiprocessors": properties.multi_processor_count,
            }
        )
    return found


def no_gpu_reason() -> str | None:
    """Why there is no CUDA GPU to check (None when there is one)."""
    if torch.cuda.device_count():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA: install a CUDA build of torch"
    return "torch has CUDA but sees no GPU (check the driver: nvidia-smi; CUDA_VISIBLE_DEVICES)"


def backends(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> dict:
    """Each backend's availability on `device` (never building the C++ extension), and the one
    the current setting runs each dtype on."""
    report = {}
    for name in ("triton", "cpp", "torch"):
        reason = backend_selection.unavailable_reason(name, device, build=False)
        report[name] = {"available": reason is None, "reason": reason}
    if report["cpp"]["available"] and device.type == "cpu":
        report["cpp"]["cpu_vector_isa"] = cpp_backend.cpu_vector_isa()
    chosen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reasons above say it all
        for dtype in dtypes:
            try:
                chosen[str(dtype).removeprefix("torch.")] = ops.resolve_backend(device, dtype)
            except RuntimeError as error:
                chosen[str(dtype).removeprefix("torch.")] = f"error: {error}"
    report["runs_on"] = chosen
    return report


def known_bad_verdicts() -> list[dict]:
    """The failed verdicts kept in the cache directory (of every device and version)."""
    found = []
    for path in sorted(cache_directory().rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("passed") is False:
            found.append(record | {"path": str(path)})
    return found
