"""`python -m fastdelta.kernels.aot`: plan the grid's compiles, compile and check them, print
the table and the failures, and optionally write every row as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import triton

from .. import _common
from .grid import full_grid
from .jit_functions import defined_kernels
from .measure import compile_rows
from .plan import SHARED_MEMORY_LIMIT, covering_rows, make_plan
from .report import _row_json, check, failure_summary, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdelta.kernels.aot",
        description="Compile every fastdelta Triton kernel for real GPUs (no GPU needed) and "
        "check registers, spills, shared memory, tensor-core dots and load widths.",
    )
    parser.add_argument(
        "--full", action="store_true", help="the whole grid (thousands of compiles)"
    )
    parser.add_argument("--targets", default="80,90", help="compute capabilities (default 80,90)")
    parser.add_argument("--json", type=Path, help="write every row to this file")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument(
        "-k", dest="keyword", default="",
        help="only launches whose kernel, dtype and case contain all these words, e.g. "
        "'lora._down bf16'",
    )  # fmt: skip
    parser.add_argument(
        "--cache-dir", type=Path,
        help="Triton's cache directory (default: Triton's); an empty one measures a cold run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if _common.INTERPRETED:
        parser.error("TRITON_INTERPRET is set: run without it, so the kernels are compiled")
    targets = [int(target) for target in args.targets.split(",") if target]
    unknown = [target for target in targets if target not in SHARED_MEMORY_LIMIT]
    if unknown:
        parser.error(f"targets {unknown} unknown: choose from {sorted(SHARED_MEMORY_LIMIT)}")
    # Keep Triton's current default (fused multiply-add on) and its warning off every compile.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = str(args.cache_dir)
    start = time.perf_counter()
    cases = full_grid()
    plan = make_plan(cases, targets, args.keyword)
    rows = list((plan.rows if args.full else covering_rows(plan)).values())
    sys.stderr.write(
        f"{len(cases)} cases, {len(rows)} compiles ({time.perf_counter() - start:.0f} s to plan)\n"
    )
    compile_rows(rows, args.jobs, _progress(start))
    for row in rows:
        row.failures = check(row)
    uncovered = [] if args.keyword else sorted(set(defined_kernels()) - plan.recorded)
    elapsed = time.perf_counter() - start
    failing = [row for row in rows if row.failures]
    cached = sum(bool(row.result.get("cached")) for row in rows)
    print(table(rows))
    print(
        f"\n{len(rows)} compiles ({cached} measurements cached) of {len(cases)} cases for "
        f"{', '.join(f'sm_{t}' for t in targets)} in {elapsed:.0f} s with {args.jobs} processes;"
        f" {len(failing)} fail"
    )
    if failing or uncovered:
        print("\nFAILURES\n" + failure_summary(rows, uncovered))
    if args.json:
        report = {
            "triton": triton.__version__,
            "grid": "full" if args.full else "quick",
            "targets": targets,
            "seconds": elapsed,
            "cases": [case.label for case in cases],
            "defined_kernels": defined_kernels(),
            "recorded_kernels": sorted(plan.recorded),
            "uncovered_kernels": uncovered,
            "rows": [_row_json(row) for row in rows],
        }
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 1 if failing or uncovered else 0


def _progress(start: float):
    """Report on stderr at each tenth of the compiles."""
    shown = set()

    def report(done: int, total: int) -> None:
        if done * 10 // total not in shown:
            shown.add(done * 10 // total)
            sys.stderr.write(f"  {done}/{total} compiled, {time.perf_counter() - start:.0f} s\n")

    return report


if __name__ == "__main__":
    sys.exit(main())
