"""Turns a benchmark run's JSON into `<device>.json`, `<device>.md` and `<device>.png`.

    python -m benchmarks.report RUN_JSON [--output-dir benchmarks/results] [--statistic min]

RUN_JSON is pytest-benchmark's `--benchmark-json` output of this suite: each benchmark's
extra_info holds its op, provider, backend, case, dtype, mode and memory, and the run's
`fastdelta` section names the device. Every time becomes a ratio to the floor of the same case,
dtype and mode measured in the same run; the targets get a pass or miss mark (reported, never
asserted). matplotlib draws the plot when it is installed; without it the JSON and Markdown
are still written and the report says that the plot was skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.cases import (
    CPU_LORA_TARGET,
    GPU_ADAPTER_TARGET,
    GPU_LORA_TARGET,
    GPU_MULTI_LORA_TARGET,
    HostCase,
    LoraCase,
)

RESULTS_DIR = Path(__file__).parent / "results"
# The report compares each benchmark's fastest round by default: on a shared machine the other
# rounds carry other processes' interference (median times of 1 ms ops read 10 ms at load 5).
STATISTICS = ("min", "median", "mean")
FLOOR = "floor"
# The provider name a target uses for fastdelta on the backend it picks by itself.
FASTDELTA = "fastdelta"
END_TO_END = "training_step"
HOST_OVERHEAD = "host_overhead"
BASELINE = "peft"  # what the end-to-end ratios divide by
OPS = {
    "lora_linear": "LoRA linear",
    "adapter_bottleneck": "Adapter bottleneck",
    "dora_linear": "DoRA linear (fastdelta: DoRA; low_rank: DoRA with dora_dropout='low_rank'; "
    "lora: fastdelta's LoRA; peft: PEFT's DoRA)",
    "multi_lora_linear": "Mixed-batch LoRA (fastdelta-<backend>: the segmented op on all rows; "
    "sequential: one lora_linear per adapter's rows; single_lora: one LoRA on all rows; "
    "mixed-layer: a linear layer with n named LoRA models under fastdelta.adapter_ids; "
    "layer-one-by-one: that layer with set_active(name) on each name's rows in turn; "
    "peft-adapter-names: PEFT's LoRA layer with n adapters, model(x, adapter_names=...), "
    "inference only)",
}
# What the host-overhead targets compare each op's fastdelta with, besides the plain layer.
HOST_BASELINES = {"lora": "peft", "adapter": "reference"}
MODE_NAMES = {"forward": "fwd", "backward": "bwd", "full": "fwd+bwd", "step": "step"}
MEMORY_KINDS = {
    "cpu": "bytes saved for backward, parameters left out",
    "cuda": "peak CUDA memory allocated above the inputs",
}
MARKS = {"pass": "✅ pass", "miss": "❌ miss", "not measured": "— not measured"}


@dataclass(frozen=True)
class Target:
    """A goal for one ratio: quantity(numerator) / quantity(denominator) `comparison` limit.

    quantity is "time" or "memory"; providers are as benchmarked, or "fastdelta" for the
    backend fastdelta picks by itself; case_id None stands for the op's only case.
    """

    description: str
    device: str
    op: str
    case_id: str | None
    dtype: str | None
    mode: str
    numerator: str
    denominator: str
    quantity: str
    comparison: str
    limit: float


TARGETS = (
    Target(
        description=f"GPU LoRA {GPU_LORA_TARGET.id} bf16 fwd+bwd: fastdelta / floor",
        device="cuda",
        op="lora_linear",
        case_id=GPU_LORA_TARGET.id,
        dtype="bfloat16",
        mode="full",
        numerator=FASTDELTA,
        denominator=FLOOR,
        quantity="time",
        comparison="<=",
        limit=1.10,
    ),
    Target(
        description=f"GPU LoRA {GPU_LORA_TARGET.id} bf16 fwd+bwd: PEFT / fastdelta",
        device="cuda",
        op="lora_linear",
        case_id=GPU_LORA_TARGET.id,
        dtype="bfloat16",
        mode="full",
        numerator="peft",
        denominator=FASTDELTA,
        quantity="time",
        comparison=">=",
        limit=1.35,
    ),
    Target(
        description=f"GPU mixed batch of 16 LoRAs {GPU_MULTI_LORA_TARGET.id} bf16 fwd+bwd: "
        "fastdelta / one LoRA on the same tokens",
        device="cuda",
        op="multi_lora_linear",
        case_id=GPU_MULTI_LORA_TARGET.id,
        dtype="bfloat16",
        mode="full",
        numerator=FASTDELTA,
        denominator="single_lora",
        quantity="time",
        comparison="<=",
        limit=1.3,
    ),
    Target(
        description=f"GPU adapter {GPU_ADAPTER_TARGET.id} bf16 fwd+bwd: eager reference / "
        "fastdelta",
        device="cuda",
        op="adapter_bottleneck",
        case_id=GPU_ADAPTER_TARGET.id,
        dtype="bfloat16",
        mode="full",
        numerator="reference",
        denominator=FASTDELTA,
        quantity="time",
        comparison=">=",
        limit=2.0,
    ),
    Target(
        description=f"GPU DoRA {GPU_LORA_TARGET.id} bf16 fwd+bwd: fastdelta's DoRA / its LoRA",
        device="cuda",
        op="dora_linear",
        case_id=GPU_LORA_TARGET.id,
        dtype="bfloat16",
        mode="full",
        numerator=FASTDELTA,
        denominator="lora",
        quantity="time",
        comparison="<=",
        limit=1.15,
    ),
    Target(
        description=f"CPU LoRA {CPU_LORA_TARGET.id} fp32 fwd+bwd: fastdelta / floor",
        device="cpu",
        op="lora_linear",
        case_id=CPU_LORA_TARGET.id,
        dtype="float32",
        mode="full",
        numerator=FASTDELTA,
        denominator=FLOOR,
        quantity="time",
        comparison="<=",
        limit=1.15,
    ),
    Target(
        description="End to end: fastdelta tokens/s / PEFT tokens/s",
        device="any",
        op=END_TO_END,
        case_id=None,
        dtype=None,
        mode="step",
        numerator="peft",  # a time ratio: PEFT's step time over fastdelta's
        denominator=FASTDELTA,
        quantity="time",
        comparison=">=",
        limit=1.25,
    ),
    Target(
        description="End to end: fastdelta under torch.compile / eager fastdelta, step time",
        device="any",
        op=END_TO_END,
        case_id=None,
        dtype=None,
        mode="step",
        numerator="compiled",
        denominator=FASTDELTA,
        quantity="time",
        comparison="<=",
        limit=1.0,
    ),
    Target(
        description="End to end: fastdelta memory / PEFT memory",
        device="any",
        op=END_TO_END,
        case_id=None,
        dtype=None,
        mode="step",
        numerator=FASTDELTA,
        denominator="peft",
        quantity="memory",
        comparison="<=",
        limit=0.8,
    ),
)


def _host_targets() -> tuple[Target, ...]:
    """The host-overhead goals, on the whole layer, training, with and without dropout: fwd+bwd
    at most 0.6x PEFT's (LoRA) or the eager reference's (adapter) and 3x the plain layer's; the
    forward at most 2.5x the plain layer's."""
    targets = []
    for op, dropouts in (("lora", (0.0, 0.1)), ("adapter", (0.0,))):
        baseline = HOST_BASELINES[op]
        for dropout in dropouts:
            goals = (("full", baseline, 0.6), ("full", FLOOR, 3.0), ("forward", FLOOR, 2.5))
            for mode, denominator, limit in goals:
                case = HostCase(op, "layer", True, dropout, mode)
                name = "plain layer" if denominator == FLOOR else denominator
                targets.append(
                    Target(
                        description=f"Host {case.id}: fastdelta / {name}",
                        device="cpu",
                        op=HOST_OVERHEAD,
                        case_id=case.id,
                        dtype="float32",
                        mode=mode,
                        numerator=FASTDELTA,
                        denominator=denominator,
                        quantity="time",
                        comparison="<=",
                        limit=limit,
                    )
                )
    return tuple(targets)


def _decode_dropout_targets() -> tuple[Target, ...]:
    """LoRA with dropout on decode-sized inputs: never slower than PEFT or the eager reference."""
    targets = []
    for rows in (1, 16):
        case = LoraCase(M=rows, K=1024, N=1024, r=16, dropout=0.1)
        for denominator in ("peft", "reference"):
            targets.append(
                Target(
                    description=f"CPU LoRA {case.id} fp32 fwd+bwd: fastdelta / {denominator}",
                    device="cpu",
                    op="lora_linear",
                    case_id=case.id,
                    dtype="float32",
                    mode="full",
                    numerator=FASTDELTA,
                    denominator=denominator,
                    quantity="time",
                    comparison="<=",
                    limit=1.0,
                )
            )
    return tuple(targets)


TARGETS += _decode_dropout_targets() + _host_targets()


def _memory(info: dict) -> int | None:
    return info.get("memory_bytes", info.get("peak_bytes", info.get("saved_bytes")))


def _merged(sweeps: list[dict]) -> dict:
    """One benchmark of the sweeps of one: all their rounds, their largest memory figure."""
    data = [seconds for sweep in sweeps for seconds in sweep["stats"]["data"]]
    largest = max(sweeps, key=lambda sweep: _memory(sweep["extra_info"]) or 0)
    info = {key: value for key, value in largest["extra_info"].items() if key != "sweep"}
    return {
        **sweeps[0],
        "name": re.sub(r"-sweep\d+", "", sweeps[0]["name"]),
        "extra_info": {**info, "sweeps": len(sweeps)},
        "stats": {
            "min": min(data),
            "median": statistics.median(data),
            "mean": statistics.fmean(data),
            "rounds": len(data),
            "data": data,
        },
    }


def merge_sweeps(benchmarks: list[dict]) -> list[dict]:
    """The benchmarks with those timed in sweeps (extra_info "sweep", see benchmarks/conftest.py)
    merged into one per op, case, dtype, mode and provider, in the place of its first sweep: the
    rounds of all its sweeps (so a statistic is taken over them all), the largest memory figure
    of its sweeps and their count ("sweeps")."""
    groups: dict[tuple, list[dict]] = {}
    for position, benchmark in enumerate(benchmarks):
        info = benchmark["extra_info"]
        swept = "sweep" in info
        key = (info["op"], info["case_id"], info["dtype"], info["mode"], info["provider"])
        groups.setdefault(key if swept else (position,), []).append(benchmark)
    return [
        _merged(group) if "sweep" in group[0]["extra_info"] else group[0]
        for group in groups.values()
    ]


def load_rows(run: dict, statistic: str) -> list[dict]:
    """One row per benchmark (a benchmark timed in sweeps merged into one, `merge_sweeps`): its
    extra_info, its time (`statistic` of its rounds, seconds), its memory figure, and whether it
    is fastdelta on the backend picked by itself."""
    rows = []
    for benchmark in merge_sweeps(run["benchmarks"]):
        info = benchmark["extra_info"]
        provider = info["provider"]
        memory = _memory(info)
        if provider == FASTDELTA:
            automatic = True
        else:
            backend = provider.removeprefix(f"{FASTDELTA}-")
            automatic = provider.startswith(f"{FASTDELTA}-") and backend == info["auto_backend"]
        rows.append(
            {
                **info,
                "name": benchmark["name"],
                "time_s": benchmark["stats"][statistic],
                "rounds": benchmark["stats"]["rounds"],
                "memory_bytes": memory,
                "automatic": automatic,
            }
        )
    return rows


def _key(row: dict) -> tuple:
    return row["op"], row["case_id"], row["dtype"], row["mode"]


def add_ratios(rows: list[dict]) -> None:
    """Each row's ratio_to_floor (None without a floor in the run); end-to-end rows get
    tokens_per_s and their time and memory ratios to PEFT's."""
    floors = {_key(row): row for row in rows if row["provider"] == FLOOR}
    baselines = {_key(row): row for row in rows if row["provider"] == BASELINE}
    for row in rows:
        floor = floors.get(_key(row))
        row["ratio_to_floor"] = None if floor is None else row["time_s"] / floor["time_s"]
        if row["op"] != END_TO_END:
            continue
        row["tokens_per_s"] = row["tokens"] / row["time_s"]
        baseline = baselines.get(_key(row))
        row["speedup_vs_peft"] = None if baseline is None else baseline["time_s"] / row["time_s"]
        row["memory_vs_peft"] = (
            None if baseline is None else row["memory_bytes"] / baseline["memory_bytes"]
        )


def _matching(rows: list[dict], target: Target, provider: str) -> dict | None:
    for row in rows:
        if (row["op"], row["mode"]) != (target.op, target.mode):
            continue
        if target.case_id is not None and row["case_id"] != target.case_id:
            continue
        if target.dtype is not None and row["dtype"] != target.dtype:
            continue
        if row["automatic"] if provider == FASTDELTA else row["provider"] == provider:
            return row
    return None


def evaluate(target: Target, rows: list[dict], device_type: str) -> dict:
    """The target's measured value and its mark: pass, miss or not measured (with why)."""
    result = {**asdict(target), "value": None, "status": "not measured", "why": None}
    if target.device not in ("any", device_type):
        result["why"] = f"stated for a {target.device} run; this run is on {device_type}"
        return result
    numerator = _matching(rows, target, target.numerator)
    denominator = _matching(rows, target, target.denominator)
    if numerator is None or denominator is None:
        missing = target.numerator if numerator is None else target.denominator
        result["why"] = f"this run has no {missing} measurement of that case"
        return result
    field = "time_s" if target.quantity == "time" else "memory_bytes"
    value = numerator[field] / denominator[field]
    passed = value <= target.limit if target.comparison == "<=" else value >= target.limit
    fastdelta_row = numerator if target.numerator == FASTDELTA else denominator
    result.update(value=value, status="pass" if passed else "miss")
    result["fastdelta_backend"] = fastdelta_row["backend"]
    return result


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _mebibytes(size: int | None) -> str:
    return "—" if size is None else f"{size / 2**20:.1f}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(line) + " |" for line in lines),
    ]


def _op_section(op: str, rows: list[dict], device_type: str) -> list[str]:
    lines = [f"## {OPS.get(op, op)}", ""]
    for mode in ("full", "inference"):  # a table of ratios per mode timed (inference: no_grad)
        lines += _ratio_table(rows, mode)
    lines += ["Every measurement:", ""]
    header = ["shape", "dtype", "mode", "provider", "backend", "time", "vs floor", "memory MiB"]
    body = [
        [
            row["case_id"],
            row["dtype"],
            MODE_NAMES.get(row["mode"], row["mode"]),
            row["provider"],
            row["backend"],
            _time(row["time_s"]),
            _ratio(row["ratio_to_floor"]),
            _mebibytes(row["memory_bytes"]),
        ]
        for row in rows
    ]
    memory_kind = MEMORY_KINDS.get(device_type, "memory")
    return [*lines, *_table(header, body), "", f"Memory: {memory_kind}.", ""]


def _ratio_table(rows: list[dict], mode: str) -> list[str]:
    """The `mode` rows' times as ratios to the floor, a line per case and dtype, a column per
    provider timed in that mode; nothing when no row has that mode."""
    timed = [row for row in rows if row["mode"] == mode]
    providers = list(dict.fromkeys(row["provider"] for row in timed if row["provider"] != FLOOR))
    pivot = {}
    for row in timed:
        pivot.setdefault((row["case_id"], row["dtype"]), {})[row["provider"]] = row
    lines = []
    if pivot:
        title = MODE_NAMES.get(mode, mode)
        lines += [f"{title} time as a ratio to the floor (lower is better):", ""]
        header = ["shape", "dtype", "floor", *providers]
        body = []
        for (case_id, dtype), by_provider in pivot.items():
            floor = by_provider.get(FLOOR)
            ratios = [
                _ratio(by_provider[p]["ratio_to_floor"]) if p in by_provider else "—"
                for p in providers
            ]
            floor_time = "—" if floor is None else _time(floor["time_s"])
            body.append([case_id, dtype, floor_time, *ratios])
        lines += [*_table(header, body), ""]
    return lines


def _host_section(rows: list[dict]) -> list[str]:
    """Per case: each provider's time per call and fastdelta's ratios to the plain layer and to
    the op's baseline (PEFT for LoRA, the eager reference for the adapter)."""
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case_id"], {})[row["provider"]] = row
    header = [
        "case", *(f"{provider} µs" for provider in providers), "fastdelta backend",
        "vs plain layer", "vs PEFT / reference",
    ]  # fmt: skip
    body = []
    for case_id, by_provider in by_case.items():
        fastdelta = by_provider.get(FASTDELTA)
        baseline = by_provider.get(HOST_BASELINES.get(case_id.split("-")[0], ""))
        times = [
            f"{by_provider[p]['time_s'] * 1e6:.1f}" if p in by_provider else "—" for p in providers
        ]
        versus = None if fastdelta is None or baseline is None else (
            fastdelta["time_s"] / baseline["time_s"]
        )  # fmt: skip
        body.append(
            [
                case_id,
                *times,
                "—" if fastdelta is None else fastdelta["backend"],
                _ratio(None if fastdelta is None else fastdelta["ratio_to_floor"]),
                _ratio(versus),
            ]
        )
    return [
        "## Host overhead per call (tiny tensors, one CPU thread)",
        "",
        "The plain layer is the floor: a trainable nn.Linear of the same size. Layer cases run "
        "the linear with its delta; op cases the functional op alone. fwd+bwd takes the "
        "gradients of the input and every trainable tensor.",
        "",
        *_table(header, body),
        "",
    ]


def _end_to_end_section(rows: list[dict]) -> list[str]:
    header = ["model", "dtype", "provider", "backend", "trainable params", "step"]
    header += ["tokens/s", "tokens/s vs PEFT", "memory MiB", "memory vs PEFT"]
    body = [
        [
            row["case_id"],
            row["dtype"],
            row["provider"],
            row["backend"],
            f"{row['trainable_parameters']:,}",
            _time(row["time_s"]),
            f"{row['tokens_per_s']:,.0f}",
            _ratio(row["speedup_vs_peft"]),
            _mebibytes(row["memory_bytes"]),
            _ratio(row["memory_vs_peft"]),
        ]
        for row in rows
    ]
    kinds = sorted({row["memory_kind"] for row in rows})
    sweeps = max(row.get("sweeps", 1) for row in rows)
    timing = (
        f" Each provider was timed in {sweeps} sweeps, every sweep timing all of them in turn; "
        "its step time is taken over the rounds of all its sweeps."
        if sweeps > 1
        else ""
    )
    return [
        "## End to end: one training step of a Llama-style decoder",
        "",
        *_table(header, body),
        "",
        f"Memory: {', '.join(kinds)}.{timing}",
        "",
    ]


def render_markdown(report: dict) -> str:
    """The report as Markdown: targets, providers left out, then a section per op."""
    load = ""
    if report.get("load_average"):
        start, end = report["load_average"]
        load = f", machine load average {start:.1f} at the start and {end:.1f} at the end"
    lines = [
        f"# fastdelta benchmarks: {report['device_name']}",
        "",
        f"Grid `{report['grid']}`, {report['datetime']}, torch {report['torch_version']}, "
        f"fastdelta {report['fastdelta_version']}, {report['cpu_threads']} CPU thread(s){load}. "
        f"Times are the {report['statistic']} of each benchmark's rounds (a round of a call "
        "too fast to fill the time given to a benchmark in 200 rounds is the mean of several "
        "calls); ratios divide by the floor measured in the same run (LoRA: the frozen base "
        "linear alone; adapter: one copy of h each way). The backend column says what computed "
        "each row.",
        "",
        "## Targets",
        "",
    ]
    body = []
    for target in report["targets"]:
        value = "—" if target["value"] is None else f"{target['value']:.2f}"
        if target.get("fastdelta_backend"):
            value += f" (fastdelta on {target['fastdelta_backend']})"
        mark = MARKS[target["status"]]
        if target["why"]:
            mark += f": {target['why']}"
        goal = f"{target['comparison']} {target['limit']:g}"
        body.append([target["description"], value, goal, mark])
    lines += [*_table(["target", "measured", "goal", "mark"], body), ""]
    if report["unavailable_providers"]:
        lines += ["## Not benchmarked", ""]
        for provider, reason in sorted(report["unavailable_providers"].items()):
            lines.append(f"- `{provider}`: {reason}")
        lines.append("")
    rows = report["results"]
    for op in dict.fromkeys(row["op"] for row in rows):
        selected = [row for row in rows if row["op"] == op]
        if op == END_TO_END:
            lines += _end_to_end_section(selected)
        elif op == HOST_OVERHEAD:
            lines += _host_section(selected)
        else:
            lines += _op_section(op, selected, report["device_type"])
    return "\n".join(lines).rstrip() + "\n"


def build_report(run: dict, statistic: str = "min") -> dict:
    """The report of a run's JSON: its rows with ratios and the targets with their marks."""
    if "fastdelta" not in run:
        raise ValueError(
            "The JSON has no 'fastdelta' section, so it is not a run of this suite: produce it "
            "with `python -m benchmarks.run` (or pytest benchmarks --benchmark-json=FILE)"
        )
    if statistic not in STATISTICS:
        raise ValueError(f"Unknown statistic {statistic!r}; choose one of {STATISTICS}")
    section = run["fastdelta"]
    rows = load_rows(run, statistic)
    add_ratios(rows)
    order = [*OPS, HOST_OVERHEAD, END_TO_END]
    rows.sort(key=lambda row: order.index(row["op"]) if row["op"] in order else len(order))
    return {
        "device": section["device_slug"],
        "device_name": section["device_name"],
        "device_type": section["device"],
        "grid": section["grid"],
        "datetime": run.get("datetime", "unknown time"),
        "torch_version": section["torch_version"],
        "fastdelta_version": section["fastdelta_version"],
        "cpu_threads": section["cpu_threads"],
        "load_average": section.get("load_average"),
        "statistic": statistic,
        "unavailable_providers": section["unavailable_providers"],
        "targets": [evaluate(target, rows, section["device"]) for target in TARGETS],
        "results": rows,
    }


def write_plot(report: dict, path: Path) -> str | None:
    """Draw the fwd+bwd ratios to the floor per shape (and the end-to-end tokens/s) into
    `path`; returns why the plot was skipped, or None once written."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (`pip install matplotlib` draws it)"
    from benchmarks.plot import draw

    draw(report, path)
    return None


def write_report(run: dict, output_dir: Path, statistic: str = "min") -> dict:
    """Write `<device>.json`, `<device>.md` and (with matplotlib) `<device>.png` into
    `output_dir`; returns the report, whose `files` and `plot_skipped` say what was written."""
    report = build_report(run, statistic)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = output_dir / report["device"]
    plot_skipped = write_plot(report, stem.with_suffix(".png"))
    report["plot_skipped"] = plot_skipped
    markdown = render_markdown(report)
    if plot_skipped:
        markdown += f"\nThe plot was skipped: {plot_skipped}.\n"
    else:
        markdown += f"\n![fwd+bwd ratio to the floor per shape]({stem.name}.png)\n"
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    report["files"] = [str(stem.with_suffix(s)) for s in (".json", ".md", ".png")]
    if plot_skipped:
        report["files"].pop()
    return report


def summary_lines(report: dict) -> list[str]:
    """What a run prints at its end: the measured targets, a skipped plot, the files."""
    lines = [
        f"{MARKS[target['status']]}: {target['description']} = {target['value']:.2f}"
        for target in report["targets"]
        if target["status"] != "not measured"
    ]
    if report["plot_skipped"]:
        lines.append(f"The plot was skipped: {report['plot_skipped']}.")
    return [*lines, f"Wrote {', '.join(report['files'])}"]


def main(argv: list[str] | None = None) -> int:
    """Command line: write the report of RUN_JSON and say where it went."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("run_json", type=Path, help="pytest-benchmark's --benchmark-json file")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--statistic", choices=STATISTICS, default="min")
    arguments = parser.parse_args(argv)
    if not arguments.run_json.is_file():
        parser.error(f"{arguments.run_json} does not exist; pass the JSON a benchmark run wrote")
    run = json.loads(arguments.run_json.read_text())
    try:
        report = write_report(run, arguments.output_dir, arguments.statistic)
    except ValueError as error:
        parser.error(str(error))
    print("\n".join(summary_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
