"""Measured dispatch between a fused kernel and a composed path.

For some ops there are two ways to the same result: one fused Triton kernel (the main GEMM with
the delta in its epilogue), or a composed path (cuBLAS's GEMM, then a small Triton pass that
adds the delta into its output). Which is faster depends on the GPU and the shape: cuBLAS's
GEMM is tuned by NVIDIA for every GPU, the fused kernel saves a read and a write of the output.
So, as Triton's autotuner does for tile sizes, the first call of each shape bucket on a GPU
times both (after each has autotuned) and keeps the faster for the process: fastdelta is never
slower than the composed path on the user's GPU.

Without a GPU there is nothing to time: the interpreter runs the fused path unless a path is
forced (the tests force each in turn). Inside a CUDA graph capture nothing can be timed either;
an unmeasured bucket then runs the fused path, and is measured at its first call outside one.
`FASTDELTA_TRITON_PATH=fused|composed` forces a path for every op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import triton

PATHS = ("fused", "composed")
ENVIRONMENT_VARIABLE = "FASTDELTA_TRITON_PATH"

_forced: str | None = None
_chosen: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}


def _check(name: str, source: str) -> str:
    if name not in PATHS:
        raise ValueError(f"Unknown Triton path {name!r} (from {source}); choose one of {PATHS}")
    return name


_environment = os.environ.get(ENVIRONMENT_VARIABLE)
if _environment:
    _forced = _check(_environment, f"${ENVIRONMENT_VARIABLE}")


@contextlib.contextmanager
def force_path(name: str | None) -> Iterator[None]:
    """Run every op on path `name` ("fused" or "composed"; None: measure) inside the block."""
    global _forced
    previous, _forced = _forced, None if name is None else _check(name, "force_path")
    try:
        yield
    finally:
        _forced = previous


def choose(key: tuple, device: torch.device, candidates: dict[str, Callable[[], object]]) -> str:
    """The path to run for `key` (a shape bucket) on `device`: the forced one, the only one, the
    one measured faster before, or, on the bucket's first call on a GPU, the faster of the
    `candidates` (functions that run each path on the call's own inputs) timed now."""
    if _forced is not None and _forced in candidates:
        return _forced
    if len(candidates) == 1:
        return next(iter(candidates))
    chosen = _chosen.get(key)
    if chosen is not None:
        return chosen
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return "fused"
    timings = {name: triton.testing.do_bench(run) for name, run in candidates.items()}
    _timings[key] = timings
    _chosen[key] = min(timings, key=timings.get)
    return _chosen[key]


def measurements() -> dict[tuple, dict[str, float]]:
    """The timings (ms) behind each measured choice so far, by shape bucket."""
    return {key: dict(times) for key, times in _timings.items()}
