"""Checking and reporting: the checks each compiled row fails, the table of the rows merged by
kernel and config, the failures by kernel and check, and a row as JSON."""

from __future__ import annotations

from collections import defaultdict

from .factors import DTYPES
from .plan import REGISTER_FILE, SHARED_MEMORY_LIMIT, Row


def check(row: Row) -> list[tuple[str, str]]:
    """(check, detail) of each check the row fails."""
    result = row.result
    if "error" in result:
        return [(result.get("check", "compiles"), result["error"])]
    failures = []
    if result["spill_stores"] or result["spill_loads"]:
        detail = f"{result['spill_stores']} B spill stores, {result['spill_loads']} B spill loads"
        failures.append(("spills", detail))
    threads = 32 * result["num_warps"]
    if result["registers"] * threads > REGISTER_FILE:
        detail = f"{result['registers']} registers x {threads} threads > {REGISTER_FILE}"
        failures.append(("registers", detail))
    if result["shared"] > SHARED_MEMORY_LIMIT[row.arch]:
        detail = f"{result['shared']} B shared memory > {SHARED_MEMORY_LIMIT[row.arch]} B"
        failures.append(("smem", detail))
    for dot in result["dots"]:
        allowed = tensor_core_kinds(dot, row.arch)
        if allowed and dot["kind"] not in allowed:
            detail = (
                f"{dot['where']}: {dot['rows']}x{dot['columns']} {dot['operand']} dot on "
                f"{dot['kind']}, not {'/'.join(allowed)}"
            )
            failures.append(("tensor cores", detail))
    for name, (bits, possible) in narrow_loads(row).items():
        failures.append(("loads", f"{name}: {bits}-bit loads where {possible}-bit are possible"))
    if result["ptx_atomics"]:
        detail = f"{result['ptx_atomics']} atomic instructions (gradients must be deterministic)"
        failures.append(("atomics", detail))
    return failures


def tensor_core_kinds(dot: dict, arch: int) -> tuple[str, ...]:
    """The lowerings a dot may have: any for IEEE float32 (no tensor core computes it)."""
    if dot["operand"] in ("f32", "f64") and dot["precision"] in ("ieee", "2"):
        return ()
    if arch < 90:
        return ("mma",)
    return ("wgmma",) if dot["rows"] >= 64 else ("mma", "wgmma")


def big_operand_loads(row: Row) -> list[tuple[str, int, int]]:
    """(parameter, narrowest load in bits, widest its tensor and tile allow) of each big operand
    the row loads, for each way it was launched."""
    result = row.result
    found = []
    for operands in row.operands:
        loaded = {name: bits for name, bits in result["loads"].items() if name in operands}
        largest = max((operands[name][0] for name in loaded), default=0)
        for name, bits in loaded.items():
            span, wide, element = operands[name]
            if span * 16 >= largest:
                tile = result["per_thread"].get(name, 128) * element
                found.append((name, min(bits), min(128, tile) if wide else min(bits)))
    return found


def narrow_loads(row: Row) -> dict[str, tuple[int, int]]:
    return {
        name: (bits, possible) for name, bits, possible in big_operand_loads(row) if bits < possible
    }


def table(rows: list[Row]) -> str:
    """One line per kernel and config, merged over dtypes, flags and specializations, with each
    target's columns: regs (a range), spills (bytes stored + loaded) and smem (the largest),
    dots (how each dot of the source lowered), loads (the narrowest load of a big operand, bits);
    the verdict names each failed check and its targets. n: the compiles merged."""
    targets = sorted({row.arch for row in rows})
    groups = {}
    for row in sorted(rows, key=lambda r: (r.kernel, r.order, r.config)):
        group = groups.setdefault((row.kernel, row.config), defaultdict(set))
        group["dtype"] |= row.dtypes
        group["flags"].add(row.flags or "-")
        group["spec"].add(row.specialization)
        group["n"].add(id(row))
        for name, _ in row.failures:
            group[f"fail {name}"].add(row.arch)
        result = row.result
        if "error" not in result:
            arch = row.arch
            group[f"regs {arch}"].add(result["registers"])
            group[f"spills {arch}"].add(result["spill_stores"] + result["spill_loads"])
            group[f"smem {arch}"].add(result["shared"])
            kinds = [dot["kind"] for dot in result["dots"]]
            lowered = " ".join(f"{kind}{kinds.count(kind)}" for kind in sorted(set(kinds)))
            group[f"dots {arch}"].add(lowered or "-")
            group[f"loads {arch}"] |= {bits for _, bits, _ in big_operand_loads(row)}
    per_target = ("regs", "spills", "smem", "dots", "loads")
    header = ["kernel", "config", "dtype", "flags", "spec", "n"]
    header += [f"{column}{arch}" for arch in targets for column in per_target] + ["verdict"]
    lines = [header]
    for (kernel, config), group in groups.items():
        line = [
            kernel, config, ",".join(sorted(group["dtype"], key=_dtype_order)),
            " | ".join(sorted(group["flags"])), " | ".join(sorted(group["spec"])),
            str(len(group["n"])),
        ]  # fmt: skip
        for arch in targets:
            regs = sorted(group[f"regs {arch}"])
            line += [
                "-" if not regs else f"{regs[0]}" if len(regs) == 1 else f"{regs[0]}-{regs[-1]}",
                str(max(group[f"spills {arch}"], default="-")),
                f"{max(group[f'smem {arch}']) / 1024:.0f}K" if group[f"smem {arch}"] else "-",
                " | ".join(sorted(group[f"dots {arch}"])) or "-",
                str(min(group[f"loads {arch}"], default="-")),
            ]
        failed = [key.removeprefix("fail ") for key in group if key.startswith("fail ")]
        line.append(
            " ".join(
                f"{name}({','.join(map(str, sorted(group[f'fail {name}'])))})" for name in failed
            )
            or "ok"
        )
        lines.append(line)
    widths = [min(max(len(line[i]) for line in lines), 32) for i in range(len(header))]
    widths[-1] = max(len(line[-1]) for line in lines)
    return "\n".join(
        "  ".join(
            _clip(cell, width).ljust(width) for cell, width in zip(line, widths, strict=True)
        ).rstrip()
        for line in lines
    )


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _dtype_order(label: str) -> int:
    return list(DTYPES).index(label) if label in DTYPES else len(DTYPES)


def failure_summary(rows: list[Row], uncovered: list[str]) -> str:
    """The failures by kernel and check: config, target, dtypes, flags and a detail."""
    grouped = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for name, detail in row.failures:
            grouped[row.kernel][name].append((row, _clip(detail.splitlines()[0], 200)))
    lines = [
        f"{name}: no launch in the grid compiles it (add it to the grid)" for name in uncovered
    ]
    for kernel in sorted(grouped):
        lines.append(f"{kernel}:")
        for name, failures in grouped[kernel].items():
            lines.append(f"  {name} ({len(failures)} compiles)")
            merged = defaultdict(set)
            for row, detail in failures:
                merged[(row.order, row.config, row.target, row.flags, detail)] |= row.dtypes
            for (_, config, target, flags, detail), dtypes in sorted(merged.items()):
                dtypes = ",".join(sorted(dtypes, key=_dtype_order))
                lines.append(f"    {config}  {target}  {dtypes}  [{flags}]  {detail}")
    return "\n".join(lines)


def _row_json(row: Row) -> dict:
    return {
        "kernel": row.kernel,
        "function": row.function,
        "config": row.config,
        "target": row.target,
        "dtypes": sorted(row.dtypes, key=_dtype_order),
        "flags": row.flags,
        "constants": row.constants,
        "specialization": row.specialization,
        "cases": sorted(row.cases),
        "result": row.result,
        "failures": [{"check": name, "detail": detail} for name, detail in row.failures],
    }
