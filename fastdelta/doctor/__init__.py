"""`fastdelta doctor`: the command a user with a GPU runs first, and pastes into a bug report.

It lists the devices and versions; says which backend can run on each device and why the others
cannot (the C++ extension is never built here: the reason says how to build it); runs the
first-use verification (`fastdelta.ops.verification`) of a representative set of kernel
variants on each CUDA device, whatever verdicts are cached, and keeps the new verdicts; checks
the public ops against the reference once more (parity: the whole path a model takes, routing
included); and times headline shapes against the floor and PEFT (`fastdelta.doctor.bench`).

Without a GPU it says so; with TRITON_INTERPRET=1 it checks the triton kernels on the CPU under
Triton's interpreter, at small sizes (the interpreter takes seconds a call at real ones).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from fastdelta.doctor import bench, checks, machine
from fastdelta.doctor.report import render


def collect(
    *, benchmark: bool, bench_seconds: float, max_seconds: float, progress: Callable[[str], None]
) -> dict:
    """The whole report, as JSON-ready data. Kernel checks not started within `max_seconds` are
    reported as skipped; the benchmark takes about `bench_seconds`."""
    deadline = time.monotonic() + max_seconds
    gpus = [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    every_device = [torch.device("cpu"), *gpus]
    checked = checks.checked_devices()
    report = {
        "versions": machine.versions(),
        "settings": machine.settings(),
        "devices": machine.devices(),
        "no_gpu": machine.no_gpu_reason(),
        "backends": {str(d): machine.backends(d, checks.DTYPES) for d in every_device},
        "checked_devices": [str(device) for device in checked],
        "verification": checks.verify(checked, deadline, progress),
        "parity": checks.parity(every_device, progress),
        "known_bad_verdicts": machine.known_bad_verdicts(),
        "benchmark": bench.run(gpus or every_device, bench_seconds, progress) if benchmark else [],
    }
    failed = [r for r in report["verification"] + report["parity"] if r["result"] == "FAILED"]
    report["summary"] = {
        "failed": len(failed),
        "checked": sum(r["result"] != "skipped" for r in report["verification"]),
        "skipped": sum(r["result"] == "skipped" for r in report["verification"]),
    }
    return report


def progress_to_stderr(message: str) -> None:
    print(f"fastdelta doctor: {message}", file=sys.stderr, flush=True)


__all__ = ["collect", "progress_to_stderr", "render"]
