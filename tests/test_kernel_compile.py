"""Every Triton kernel compiled for real GPUs (sm_80 and sm_90), with no GPU: what hardware
enforces and the interpreter does not.

The other kernel tests run the kernels' math under TRITON_INTERPRET=1. This file runs the
ahead-of-time compile suite, `python -m fastdelta.kernels.aot`, in a process without
TRITON_INTERPRET, and asserts each of its checks on every kernel it compiles: compiles (and the
launcher and the pruner accept the launch), no register spills, registers and shared memory
within the block's limits, dots on tensor cores, 128-bit loads of the big operands where their
layout allows them, no atomic instructions (deterministic gradients). A failure names the
kernel, config, dtype and target, and the launcher call that compiles it.

By default the suite runs its quick grid: every config of every kernel on every target, each
dtype, constant and specialization of each kernel at least once (about four minutes on two cores
with a cold Triton cache, seconds with a warm one). FASTDELTA_AOT_GRID=full runs the full grid,
every pair of argument values and every combination of dtype, rows, rank and dropout (about
12,000 compiles: an hour or more on two cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the compile suite compiles Triton kernels")

GRID = os.environ.get("FASTDELTA_AOT_GRID", "quick")
CHECKS = (
    "records", "config", "compiles", "spills", "registers", "smem", "tensor cores", "loads",
    "atomics",
)  # fmt: skip
# Failures listed in full per check; the rest are counted.
LISTED = 40


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The compile suite's JSON report of its grid."""
    if GRID not in ("quick", "full"):
        raise ValueError(f"FASTDELTA_AOT_GRID={GRID!r}: use quick or full")
    path = tmp_path_factory.mktemp("aot") / "report.json"
    command = [sys.executable, "-m", "fastdelta.kernels.aot", "--json", str(path)]
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run(
        command + (["--full"] if GRID == "full" else []),
        env=environment,
        capture_output=True,
        text=True,
        timeout=None if GRID == "full" else 1800,
    )
    if not path.exists():
        pytest.fail(
            f"the compile suite stopped before its report (exit {completed.returncode}):\n"
            f"{completed.stderr[-4000:]}"
        )
    return json.loads(path.read_text())


@pytest.mark.parametrize("check", CHECKS)
def test_every_compiled_kernel_passes(report, check):
    failures = [
        f"{row['kernel']} [{row['config']}] {','.join(row['dtypes'])} {row['target']} "
        f"[{row['flags']}]: {failure['detail'].splitlines()[0][:300]}\n    e.g. {row['cases'][0]}"
        for row in report["rows"]
        for failure in row["failures"]
        if failure["check"] == check
    ]
    if failures:
        more = f"\n... and {len(failures) - LISTED} more" if len(failures) > LISTED else ""
        pytest.fail(
            f"{len(failures)} compiles fail '{check}' on the {report['grid']} grid (python -m "
            f"fastdelta.kernels.aot prints them all):\n" + "\n".join(failures[:LISTED]) + more,
            pytrace=False,
        )


def test_every_kernel_is_compiled(report):
    """Each @triton.jit kernel the kernels package defines (its JIT functions that no other one
    calls) is compiled by some launch of the grid, so a new kernel cannot slip by uncompiled."""
    from fastdelta.kernels import aot

    defined = set(aot.defined_kernels())
    recorded = set(report["recorded_kernels"])
    assert defined == recorded, (
        f"kernels no launch of the grid compiles: {sorted(defined - recorded)} (add their "
        "launchers to FACTORS in fastdelta/kernels/aot/factors.py and CALLS in "
        f"fastdelta/kernels/aot/recording.py); "
        f"launched but not found as kernels: {sorted(recorded - defined)}"
    )


def test_atomic_instructions_are_found():
    from fastdelta.kernels import aot

    ptx = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p3 atom.global.gpu.acq_rel.add.f32 %f9, [ %rd7 + 0 ], %f8;
    red.global.gpu.relaxed.add.f32 [ %rd9 + 0 ], %f10;
    // stored.value red. in a comment
    st.global.b32 [ %rd2 + 0 ], %r5;
    """
    assert aot.atomic_instructions(ptx) == 2
    assert aot.atomic_instructions("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 0


def test_a_copy_that_transposes_into_shared_memory_moves_one_element_a_thread():
    from fastdelta.kernels import aot

    # sm_90, TF32: dY's tile keeps its row-major order in shared memory; B's, contiguous along
    # the dot's N in memory, is stored K-major for wgmma, so its copy cannot be vectorised.
    ttgir = """
#blocked = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [2, 16], warpsPerCTA = [4, 1], order = [1, 0]}>
#shared = #ttg.nvmma_shared<{swizzlingByteWidth = 128, transposed = false, elementBitWidth = 32}>
#shared1 = #ttg.nvmma_shared<{swizzlingByteWidth = 128, transposed = true, elementBitWidth = 32}>
module attributes {"ttg.num-warps" = 4 : i32} {
  tt.func public @k(%dy_ptr: !tt.ptr<f32>, %b_ptr: !tt.ptr<f32>) {
    %dy = tt.splat %dy_ptr : !tt.ptr<f32> -> tensor<64x64x!tt.ptr<f32>, #blocked>
    %b = tt.splat %b_ptr : !tt.ptr<f32> -> tensor<64x64x!tt.ptr<f32>, #blocked>
    %dy_1 = ttg.async_copy_global_to_local %dy, %s0 : tensor<64x64x!tt.ptr<f32>, #blocked> -> <64x64xf32, #shared, #smem, mutable>
    %b_1 = ttg.async_copy_global_to_local %b, %s1 : tensor<64x64x!tt.ptr<f32>, #blocked> -> <64x64xf32, #shared1, #smem, mutable>
  }
}
"""  # noqa: E501
    assert aot.elements_per_thread(ttgir) == {"dy_ptr": 32, "b_ptr": 1}
