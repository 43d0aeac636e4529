"""The doctor's report as text: what a user reads, and pastes into a bug report."""

from __future__ import annotations


def render(report: dict) -> str:
    """The report as text: what a user reads and pastes."""
    lines = [f"fastdelta doctor ({report['versions']['fastdelta']})", "", "versions:"]
    lines += [f"  {name}: {value or '-'}" for name, value in report["versions"].items()]
    lines += ["", "settings:"]
    lines += [f"  {name}: {value or '-'}" for name, value in report["settings"].items()]
    lines += ["", "devices:"]
    for device in report["devices"]:
        details = ", ".join(f"{k} {v}" for k, v in device.items() if k not in ("device", "name"))
        lines.append(f"  {device['device']}: {device['name']} ({details})")
    if report["no_gpu"]:
        lines.append(f"  no CUDA GPU: {report['no_gpu']}")
    lines += ["", "backends:"]
    for device, entries in report["backends"].items():
        runs_on = ", ".join(f"{dtype} on {name}" for dtype, name in entries["runs_on"].items())
        lines.append(f"  {device}: runs {runs_on}")
        for name in ("triton", "cpp", "torch"):
            entry = entries[name]
            state = "available" if entry["available"] else f"not available: {entry['reason']}"
            if "cpu_vector_isa" in entry:
                state += f" (its CPU loops run {entry['cpu_vector_isa']})"
            lines.append(f"    {name}: {state}")
    lines += ["", "first-use verification of the kernels:"]
    if not report["verification"]:
        lines.append(
            "  nothing to check: no CUDA GPU (set TRITON_INTERPRET=1 to check the triton "
            "kernels on the CPU under Triton's interpreter)"
        )
    for record in report["verification"]:
        error = f": {record['error']}" if record["error"] else ""
        seconds = f" ({record['seconds']:.1f} s)" if "seconds" in record else ""
        lines.append(
            f"  {record['result']:9} {record['backend']:6} {record['description']}{seconds}{error}"
        )
    lines += ["", "parity of the public ops with the reference:"]
    for record in report["parity"]:
        error = f": {record['error']}" if record["error"] else ""
        lines.append(
            f"  {record['result']:9} {record['op']:7} {record['device']} {record['dtype']} "
            f"({record['rows']} rows) on {record['backend']}{error}"
        )
    if report["known_bad_verdicts"]:
        lines += ["", "failed verdicts kept in the cache:"]
        lines += [f"  {r['path']}: {r['error']}" for r in report["known_bad_verdicts"]]
    lines += ["", "benchmark (a training step, median; vs_floor: times the floor's):"]
    if not report["benchmark"]:
        lines.append("  skipped (--no-bench)")
    for record in report["benchmark"]:
        backend = f" ({record['backend']})" if record["backend"] else ""
        lines.append(
            f"  {record['device']} {record['dtype']} {record['case']}: "
            f"{record['provider']}{backend} {record['step_ms']:.3f} ms, "
            f"{record['vs_floor']:.2f}x the floor"
        )
    summary = report["summary"]
    verdict = f"{summary['failed']} FAILED" if summary["failed"] else "all passed"
    lines += [
        "",
        f"summary: {verdict} ({summary['checked']} kernel variants checked, "
        f"{summary['skipped']} skipped for time)",
    ]
    return "\n".join(lines)
