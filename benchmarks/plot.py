"""The report's plot: each provider's fwd+bwd time over the floor's, per shape, one panel per op
and dtype, plus the end-to-end tokens/s. Needs matplotlib; the report skips the plot without it.

It draws on a bare `Figure` (no pyplot), so no display backend is chosen or needed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from benchmarks.report import END_TO_END, FLOOR, OPS

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
# Beyond this many bars in a panel their value labels would overlap.
MAX_LABELLED_BARS = 40
LOG_SCALE_ABOVE = 4.0


def _panels(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(op, dtype, fwd+bwd rows) per op panel, in the order of the run."""
    panels: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["op"] != END_TO_END and row["mode"] == "full":
            panels.setdefault((row["op"], row["dtype"]), []).append(row)
    return [(op, dtype, selected) for (op, dtype), selected in panels.items()]


def _draw_targets(axes, targets: list[dict], cases: list[str]) -> None:
    """A dotted line over each case that a "fastdelta / floor" target is stated at."""
    for target in targets:
        if target["denominator"] == FLOOR and target["case_id"] in cases:
            position = cases.index(target["case_id"])
            label = f"target {target['comparison']} {target['limit']:g}"
            span = (position - 0.45, position + 0.45)
            axes.hlines(target["limit"], *span, colors="red", linestyles=":", label=label)


def _draw_ratios(axes, op: str, dtype: str, rows: list[dict], colors: dict, targets) -> None:
    cases = list(dict.fromkeys(row["case_id"] for row in rows))
    providers = list(dict.fromkeys(row["provider"] for row in rows if row["provider"] != FLOOR))
    width = 0.8 / max(len(providers), 1)
    labelled = len(cases) * len(providers) <= MAX_LABELLED_BARS
    ratios = [row["ratio_to_floor"] for row in rows if row["ratio_to_floor"] is not None]
    if max(ratios, default=1.0) > LOG_SCALE_ABOVE:
        # Decode shapes run several times the floor; a log axis keeps training shapes readable.
        axes.set_yscale("log", base=2)
        axes.yaxis.set_major_formatter(ScalarFormatter())
    for index, provider in enumerate(providers):
        by_case = {
            row["case_id"]: row["ratio_to_floor"]
            for row in rows
            if row["provider"] == provider and row["ratio_to_floor"] is not None
        }
        offset = (index - (len(providers) - 1) / 2) * width
        positions = [i + offset for i, case in enumerate(cases) if case in by_case]
        heights = [by_case[case] for case in cases if case in by_case]
        bars = axes.bar(positions, heights, width, label=provider, color=colors[provider])
        if labelled:
            axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    axes.axhline(1.0, color="black", linestyle="--", linewidth=1, label="floor")
    _draw_targets(axes, [t for t in targets if (t["op"], t["dtype"]) == (op, dtype)], cases)
    axes.set_xticks(range(len(cases)), cases, rotation=25, ha="right", fontsize=8)
    axes.set_ylabel("fwd+bwd time / floor")
    axes.set_title(f"{OPS.get(op, op)}, {dtype}: time over the floor (lower is better)")
    low, high = axes.get_ylim()
    axes.set_ylim(low, high * 1.15)
    axes.legend(fontsize=8, ncols=min(len(providers) + 2, 7), loc="upper left")


def _draw_end_to_end(axes, rows: list[dict], colors: dict) -> None:
    providers = [
        f"{row['provider']} ({row['backend']})"
        if row["provider"] == "fastdelta"
        else row["provider"]
        for row in rows
    ]
    bars = axes.bar(
        providers,
        [row["tokens_per_s"] for row in rows],
        color=[
            colors.get(f"{row['provider']}-{row['backend']}", colors[row["provider"]])
            for row in rows
        ],
    )
    labels = [
        f"{row['tokens_per_s']:,.0f} tok/s\n{row['memory_bytes'] / 2**20:,.0f} MiB" for row in rows
    ]
    axes.bar_label(bars, labels, fontsize=8, padding=2)
    axes.set_ylim(0, axes.get_ylim()[1] * 1.25)
    axes.set_ylabel("tokens / s")
    axes.set_title(f"Training step, {rows[0]['case_id']} {rows[0]['dtype']} (higher is better)")


def draw(report: dict, path: Path) -> None:
    """Draw the report's plot into `path` (PNG)."""
    rows = report["results"]
    panels = _panels(rows)
    end_to_end = [row for row in rows if row["op"] == END_TO_END]
    providers = list(dict.fromkeys(row["provider"] for row in rows if row["provider"] != FLOOR))
    colors = {p: COLORS[i % len(COLORS)] for i, p in enumerate(providers)}
    device_type = report["device_type"]
    targets = [t for t in report["targets"] if t["device"] in ("any", device_type)]
    widest = max((len({row["case_id"] for row in selected}) for *_, selected in panels), default=1)
    count = len(panels) + bool(end_to_end)
    figure = Figure(figsize=(max(9.0, 1.1 * widest), 4.2 * max(count, 1)), layout="constrained")
    figure.suptitle(f"fastdelta benchmarks: {report['device_name']} ({report['grid']} grid)")
    all_axes = figure.subplots(max(count, 1), 1, squeeze=False)[:, 0]
    for axes, (op, dtype, selected) in zip(all_axes, panels, strict=False):
        _draw_ratios(axes, op, dtype, selected, colors, targets)
    if end_to_end:
        _draw_end_to_end(all_axes[len(panels)], end_to_end, colors)
    figure.savefig(path, dpi=110)
