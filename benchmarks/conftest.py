"""pytest options and parametrisation of the benchmark files.

Each `bench_*.py` file declares `PROVIDERS` and `cases(grid, device_type)`; a benchmark
function that takes `case`, `provider`, `dtype` or `mode` is parametrised here from them and
from the options `--grid` (`--quick`), `--device`, `--dtypes` and `--providers`. Providers run
innermost, so each provider is timed right after the floor of the same case. One that takes
`sweep` is run that many times over (`sweeps(grid, device_type)` of its file), every provider
once a sweep; the report merges a provider's sweeps into one row. The run's JSON
gets a `fastdelta` section: the device, the grid and the providers left out with the reasons.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastdelta
from benchmarks import harness
from fastdelta.cli import GRIDS

LOAD_AT_START = pytest.StashKey[float]()
NAMED_PROVIDERS_SEEN = pytest.StashKey[set]()


def pytest_addoption(parser):
    group = parser.getgroup("fastdelta benchmarks")
    group.addoption(
        "--grid",
        choices=GRIDS,
        default="full",
        help="shapes to run: full (the default, made for a GPU), quick (a few minutes on a "
        "CPU) or smoke (minuscule shapes, proves the suite runs)",
    )
    group.addoption(
        "--quick", action="store_const", dest="grid", const="quick", help="--grid quick"
    )
    group.addoption(
        "--device",
        default=None,
        help="torch device to run on (default: cuda when available, else cpu)",
    )
    group.addoption(
        "--dtypes",
        default=None,
        help="comma-separated dtypes of the op benchmarks (default: bfloat16,float32 on CUDA, "
        "float32 on the CPU, whose bfloat16 matmuls are slow)",
    )
    group.addoption(
        "--providers",
        default=None,
        help="comma-separated providers to run (default: all); e.g. floor,fastdelta-torch,peft. "
        "Naming them avoids even asking about the others (the cpp backend's first use compiles "
        "its extension)",
    )
    group.addoption(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch (default: torch's own choice, one per core)",
    )


def pytest_configure(config):
    if config.getoption("threads") is not None:
        torch.set_num_threads(config.getoption("threads"))
    # Other work on the machine skews every figure; the report shows how busy it was.
    config.stash[LOAD_AT_START] = os.getloadavg()[0]


def _device(config) -> torch.device:
    name = config.getoption("device")
    return harness.default_device() if name is None else torch.device(name)


def _dtypes(config, device: torch.device) -> list[str]:
    option = config.getoption("dtypes")
    if option is None:
        return ["bfloat16", "float32"] if device.type == "cuda" else ["float32"]
    names = [name.strip() for name in option.split(",") if name.strip()]
    unknown = [name for name in names if name not in harness.DTYPES]
    if unknown:
        raise ValueError(
            f"--dtypes names {', '.join(unknown)}, which the benchmarks do not run; choose from "
            f"{', '.join(harness.DTYPES)}"
        )
    return names


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = _device(config)
    module = metafunc.module
    names = metafunc.fixturenames
    if "case" in names:
        cases = module.cases(config.getoption("grid"), device.type)
        metafunc.parametrize("case", cases, ids=[case.id for case in cases])
    if "dtype" in names:
        dtypes = _dtypes(config, device)
        metafunc.parametrize("dtype", [harness.DTYPES[name] for name in dtypes], ids=dtypes)
    if "mode" in names:
        metafunc.parametrize("mode", harness.MODES)
    if "sweep" in names:  # before the providers, so that each sweep runs all of them
        count = module.sweeps(config.getoption("grid"), device.type)
        sweeps = [harness.Sweep(index, count) for index in range(count)]
        metafunc.parametrize("sweep", sweeps, ids=[f"sweep{i}" for i in range(count)])
    if "provider" in names:
        selected = config.getoption("providers")
        providers = module.PROVIDERS
        if selected is not None:
            wanted = {name.strip() for name in selected.split(",")}
            config.stash.setdefault(NAMED_PROVIDERS_SEEN, set()).update(wanted & set(providers))
            providers = [provider for provider in providers if provider in wanted]
        metafunc.parametrize("provider", harness.available_providers(providers, device))


def pytest_collection_finish(session):
    selected = session.config.getoption("providers")
    if selected is None:
        return
    unknown = {n.strip() for n in selected.split(",")} - session.config.stash.get(
        NAMED_PROVIDERS_SEEN, set()
    )
    if unknown:
        raise pytest.UsageError(
            f"--providers names {', '.join(sorted(unknown))}, which no collected benchmark "
            "has; the providers are floor, fastdelta-<backend>, peft and reference (ops) and "
            "fastdelta, peft and full-finetune (end to end)"
        )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device the benchmarks run on (--device)."""
    return _device(request.config)


@pytest.fixture(scope="session")
def timing(request) -> harness.Timing:
    """Rounds and time per benchmark, from pytest-benchmark's own options."""
    config = request.config
    return harness.Timing(
        min_rounds=config.getoption("benchmark_min_rounds"),
        max_time=float(config.getoption("benchmark_max_time")),
    )


def pytest_benchmark_update_json(config, benchmarks, output_json):
    device = _device(config)
    output_json["fastdelta"] = {
        "device": device.type,
        "device_name": harness.device_name(device),
        "device_slug": harness.device_slug(device),
        "grid": config.getoption("grid"),
        "fastdelta_version": fastdelta.__version__,
        "torch_version": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "load_average": [config.stash[LOAD_AT_START], os.getloadavg()[0]],
        "unavailable_providers": dict(harness.UNAVAILABLE_PROVIDERS),
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for provider, reason in sorted(harness.UNAVAILABLE_PROVIDERS.items()):
        terminalreporter.write_line(f"not benchmarked: {provider}: {reason}")
