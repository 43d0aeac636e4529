"""The harness every benchmark file shares: devices, backends, timing and memory.

A benchmark file only builds a `Workload` for each provider and case; `run_workload` warms it
up, measures its memory once, then has pytest-benchmark time one mode of it, in as many rounds
as fit in --benchmark-max-time by the warm-up's pace (at least --benchmark-min-rounds, at most
MAX_ROUNDS), so a busy machine cannot stretch a benchmark without bound:
- forward: the training forward (autograd records the graph and saves what backward needs);
- backward: the gradients of the input and the trainable parameters, from one recorded graph;
- full: both, as a training step runs them.
Every timed call ends with a device synchronisation, so CUDA's asynchronous launches are timed
to completion, not to their return.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch

from fastdelta.ops.backend import BACKENDS, resolve_backend, set_backend, unavailable_reason

MODES = ("forward", "backward", "full")
FLOOR = "floor"
# Calls before timing: the first compiles or autotunes (Triton) and grows allocator caches; the
# fastest of them sets the number of rounds.
WARMUP_CALLS = 3
MAX_ROUNDS = 200
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Providers left out of this run, with the reason ({"fastdelta-cpp": "the C++ ..."}); the
# conftest writes them into the run's JSON, so the report can say why a column is missing.
UNAVAILABLE_PROVIDERS: dict[str, str] = {}


@dataclass(frozen=True)
class Timing:
    """How long to time each benchmark: pytest-benchmark's --benchmark-min-rounds and
    --benchmark-max-time (seconds)."""

    min_rounds: int
    max_time: float

    def share(self, parts: int) -> Timing:
        """The timing of one of `parts` sweeps, which together get this one's rounds and time."""
        return Timing(min_rounds=-(-self.min_rounds // parts), max_time=self.max_time / parts)


@dataclass(frozen=True)
class Sweep:
    """Sweep `index` of `count` (see benchmarks/conftest.py)."""

    index: int
    count: int


@dataclass
class Workload:
    """What one provider runs for one case.

    forward: runs the op (or module) on its prepared input and returns the output;
    inputs: the tensors backward differentiates (the input, the trainable parameters);
    parameters: every parameter the op reads, left out of the saved-for-backward bytes since
    they are resident anyway; backend: what computes it (a fastdelta backend, "aten", "peft");
    fastdelta_backend: the fastdelta backend forced while it runs, if any.
    """

    forward: Callable[[], torch.Tensor]
    inputs: Sequence[torch.Tensor]
    parameters: Sequence[torch.Tensor]
    backend: str
    fastdelta_backend: str | None = None


def default_device() -> torch.device:
    """The device the suite runs on when none is named: the CUDA GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    """A readable name of the device: the GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(device: torch.device) -> str:
    """The file name stem of the device's results: "nvidia-h100-80gb-hbm3", or "cpu"."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA launches return before the kernels finish)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastdelta_provider(backend: str) -> str:
    """The provider name of fastdelta forced to `backend`: "fastdelta-triton", ..."""
    return f"fastdelta-{backend}"


def fastdelta_providers() -> tuple[str, ...]:
    """One provider per concrete fastdelta backend (every entry of BACKENDS but "auto")."""
    return tuple(fastdelta_provider(name) for name in BACKENDS if name != "auto")


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why fastdelta's `backend` cannot be timed on `device`; None when it can."""
    reason = unavailable_reason(backend, device)
    if reason is None and backend == "triton" and device.type == "cpu":
        return (
            "Triton's kernels reach CPU tensors only through its interpreter "
            "(TRITON_INTERPRET=1), far too slow to time; time triton on a CUDA GPU"
        )
    return reason


def available_providers(providers: Sequence[str], device: torch.device) -> list[str]:
    """`providers` without the fastdelta backends that cannot run on `device`; those are
    recorded in UNAVAILABLE_PROVIDERS with their reason."""
    available = []
    for provider in providers:
        backend = provider.removeprefix("fastdelta-") if provider.startswith("fastdelta-") else None
        reason = None if backend is None else backend_unavailable_reason(backend, device)
        if reason is None:
            available.append(provider)
        else:
            UNAVAILABLE_PROVIDERS[provider] = reason
    return available


@contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Run fastdelta's ops on backend `name` inside the block, then go back to "auto"."""
    set_backend(name)
    try:
        yield
    finally:
        set_backend("auto")


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend fastdelta picks by itself for `dtype` tensors on `device`."""
    with forced_backend("auto"):
        return resolve_backend(device, dtype)


def case_info(op: str, provider: str, case, dtype: torch.dtype, device: torch.device) -> dict:
    """What the report needs to know of a benchmark, for its extra_info. `case` is a dataclass
    with an `id`."""
    return {
        "op": op,
        "provider": provider,
        "case": asdict(case),
        "case_id": case.id,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "auto_backend": auto_backend(device, dtype),
    }


def saved_tensor_bytes(run: Callable[[], object], exclude: Sequence[torch.Tensor]) -> int:
    """Bytes that autograd saves for backward while `run` records a graph: distinct storages
    (a view and its base count once), without those of the `exclude` tensors (parameters)."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def cuda_peak_bytes(run: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """(the most CUDA memory allocated while `run` ran, what was allocated before it)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device), before


def timed_function(workload: Workload, mode: str, device: torch.device) -> Callable[[], None]:
    """The call pytest-benchmark times for `mode` (see the module docstring), synchronised."""
    if mode not in MODES:
        raise ValueError(f"Unknown benchmark mode {mode!r}; choose one of {', '.join(MODES)}")
    inputs = list(workload.inputs)

    def forward() -> None:
        workload.forward()
        synchronize(device)

    if mode == "forward":
        return forward
    output = workload.forward()
    grad_output = torch.randn_like(output)

    def backward() -> None:
        # autograd.grad returns the gradients instead of accumulating them into .grad, so
        # every round does the same work.
        torch.autograd.grad(output, inputs, grad_output, retain_graph=True)
        synchronize(device)

    def full() -> None:
        torch.autograd.grad(workload.forward(), inputs, grad_output)
        synchronize(device)

    return backward if mode == "backward" else full


def memory_info(run: Callable[[], object], workload: Workload, device: torch.device) -> dict:
    """The memory figures of one forward and backward: saved-for-backward bytes, and on CUDA
    the peak allocated above the inputs."""
    info = {"saved_bytes": saved_tensor_bytes(run, workload.parameters)}
    if device.type == "cuda":
        peak, before = cuda_peak_bytes(run, device)
        info["peak_bytes"] = peak - before
    return info


def time_call(
    benchmark, call: Callable[[], None], timing: Timing, warmup_calls: int = WARMUP_CALLS
) -> None:
    """Warm `call` up, then time it with pytest-benchmark in a number of rounds that fits
    `timing.max_time` at the warm-up's pace (within [timing.min_rounds, MAX_ROUNDS]). A call
    so fast that MAX_ROUNDS of it would take less than max_time runs several times a round
    (its time is their mean), so that its rounds still span max_time: the fastest round of a
    100 us call is then picked out of a second, not out of 20 ms that one stall of a shared
    machine covers whole."""
    fastest = float("inf")
    for _ in range(warmup_calls):
        start = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - start)
    fastest = max(fastest, 1e-9)
    rounds = max(timing.min_rounds, min(MAX_ROUNDS, int(timing.max_time / fastest)))
    iterations = max(1, int(timing.max_time / (rounds * fastest)))
    benchmark.pedantic(call, rounds=rounds, iterations=iterations)


def run_workload(
    benchmark, workload: Workload, mode: str, device: torch.device, info: dict, timing: Timing
) -> None:
    """Record `info` (see `case_info`) and the memory of one forward and backward of `workload`
    in the benchmark's extra_info, then time `mode` of it, grouped with the other providers of
    the same case."""
    benchmark.group = f"{info['op']} {info['case_id']} {info['dtype']} {mode}"
    forcing = workload.fastdelta_backend
    with forced_backend(forcing) if forcing else nullcontext():
        step = timed_function(workload, "full", device)
        step()  # warms what the memory measurement runs
        benchmark.extra_info.update(info, mode=mode, backend=workload.backend)
        benchmark.extra_info.update(memory_info(step, workload, device))
        if mode == "full":  # warmed up twice already
            time_call(benchmark, step, timing, warmup_calls=1)
        else:
            time_call(benchmark, timed_function(workload, mode, device), timing)
