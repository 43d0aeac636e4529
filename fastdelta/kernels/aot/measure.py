"""Compiling and measuring the rows' kernels, in worker processes: each through Triton's whole
pipeline to a cubin, its measurements cached beside Triton's cached kernel."""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import triton

from .analysis import atomic_instructions, dots, elements_per_thread, global_loads, ptxas_numbers
from .jit_functions import _unwrap
from .plan import Row
from .triton_internals import (
    ASTSource,
    GPUTarget,
    get_cache_manager,
    get_ptxas,
    knobs,
    sm_arch_from_capability,
)

# Bump when the analysis of a compiled kernel changes: its results are cached beside the kernel.
ANALYSIS_VERSION = 5


def compile_rows(rows: list[Row], jobs: int, progress=None) -> None:
    """Fill each row's result, compiling in `jobs` processes (forked where the platform can: a
    fork inherits the imported modules; no process here has run a kernel or the interpreter)."""
    rows = [row for row in rows if row.job is not None]
    if jobs <= 1:
        for done, row in enumerate(rows, 1):
            row.result = compile_and_measure(row.job)
            if progress:
                progress(done, len(rows))
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(compile_and_measure, row.job): row for row in rows}
        for done, future in enumerate(as_completed(futures), 1):
            futures[future].result = future.result()
            if progress:
                progress(done, len(rows))


def compile_and_measure(job: dict) -> dict:
    """Compile `job` for its target and measure it, or {"error": ...} when it does not compile.
    The measurements are cached beside Triton's cached kernel."""
    function = _find_function(job["module"], job["qualname"])
    source = ASTSource(function, job["signature"], job["constexprs"], job["attrs"])
    start = time.perf_counter()
    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its `ptxas -v` log: no second ptxas run
    with tempfile.TemporaryFile(mode="w+") as output:
        try:
            with _redirected(output):
                compiled = triton.compile(
                    source, target=GPUTarget("cuda", job["arch"], 32), options=job["options"]
                )
        except Exception as error:  # a kernel that does not compile is a finding, reported
            output.seek(0)
            return {"error": _error_summary(error, output.read())}
        finally:
            knobs.nvidia.dump_ptxas_log = previous
        output.seek(0)
        log = output.read()
    cache = get_cache_manager(compiled.hash)
    artifacts = getattr(cache, "cache_dir", None)  # TTGIR, PTX, cubin: where to look closer
    facts_file = f"fastdelta_aot_{ANALYSIS_VERSION}.json"
    cached = cache.get_file(facts_file)
    if cached is not None:
        facts = json.loads(Path(cached).read_text())
        return {**facts, "artifacts": artifacts, "seconds": 0.0, "cached": True}
    asm = compiled.asm
    # PTX drops constexpr parameters; only pointers are operands.
    parameters = [name if kind.startswith("*") else None
                  for name, kind in job["signature"].items() if kind != "constexpr"]  # fmt: skip
    facts = {
        "shared": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        # A compile that Triton's cache answered printed no log: run ptxas as Triton runs it.
        **ptxas_numbers(
            log if "registers" in log else ptxas_log(asm["ptx"], job["arch"], job["options"])
        ),
        "dots": dots(asm["ttgir"]),
        "ptx_mma": len(re.findall(r"\bmma\.sync\b", asm["ptx"])),
        "ptx_wgmma": len(re.findall(r"\bwgmma\.mma_async\b", asm["ptx"])),
        "ptx_atomics": atomic_instructions(asm["ptx"]),
        "loads": global_loads(asm["ptx"], parameters),
        "per_thread": elements_per_thread(asm["ttgir"]),
    }
    cache.put(json.dumps(facts), facts_file, binary=False)
    seconds = time.perf_counter() - start
    return {**facts, "artifacts": artifacts, "seconds": seconds, "cached": False}


def _find_function(module_name: str, qualname: str):
    for value in vars(importlib.import_module(module_name)).values():
        function = _unwrap(value)
        if function is not None and function.fn.__qualname__ == qualname:
            return function
    raise LookupError(f"no JIT function {qualname} in {module_name}")


@contextlib.contextmanager
def _redirected(file):
    """This process's stdout and stderr (Python's and the compiler's C++) into `file`: a failed
    compile prints its IR or its MLIR diagnostics."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(file.fileno(), 1)
    os.dup2(file.fileno(), 2)
    try:
        with contextlib.redirect_stdout(file), contextlib.redirect_stderr(file):
            yield
    finally:
        file.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def _error_summary(error: Exception, output: str) -> str:
    """The error's last line (a CompilationError ends with it) and the source line its caret
    points at, then the compiler's own error lines (MLIR diagnostics) from its output."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    summary = f"{type(error).__name__}: {lines[-1].strip() if lines else ''}"
    caret = [i for i, line in enumerate(lines) if line.strip() == "^"]
    if caret and caret[0] > 0:
        summary += f" (at `{lines[caret[0] - 1].strip()}`)"
    diagnostics = [line.strip() for line in output.splitlines() if "error" in line.lower()]
    return "\n".join([summary, *diagnostics[:3]])


def ptxas_log(ptx: str, arch: int, options: dict) -> str:
    """The log of `ptxas -v` run on `ptx` as Triton's make_cubin runs it."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "kernel.ptx")
        path.write_text(ptx)
        fmad = [] if options["enable_fp_fusion"] else ["--fmad=false"]
        command = [
            get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}", str(path), "-o", f"{path}.cubin",
        ]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr
