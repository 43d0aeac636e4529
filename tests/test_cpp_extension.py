"""The C++/CUDA extension behind the cpp backend: building, caching, loading, failing well.

The op tests (test_lora_op.py, test_adapter_op.py) check the extension's results against the
reference on every backend; this file checks how it is built and found: it builds here (where a
compiler is), the build is cached under a key of its sources, a second process reuses it, a
missing compiler or a failed build never breaks `import fastdelta` (the automatic choice skips
the cpp backend and logs why, a forced cpp backend raises naming what is missing), and the CUDA
sources compile with nvcc wherever nvcc is, a GPU or not, with no kernel that spills registers,
uses local memory or declares too much shared memory on sm_80 or sm_90 (ptxas's audit:
`pytest tests/test_cpp_extension.py -k ptxas -s` prints its table).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import fastdelta
from fastdelta import ops
from fastdelta.ops import _extension, reference
from fastdelta.ops import backend as backend_selection
from fastdelta.ops import cpp_backend as cpp_ops
from fastdelta.ops.backend import ENVIRONMENT_VARIABLE, resolve_backend, unavailable_reason

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def fresh_extension(monkeypatch, tmp_path):
    """The extension as a new process sees it, with an empty cache directory and no setup.py
    build; the backend setting is "auto". Everything is restored afterwards (an extension already
    loaded in this process stays loaded)."""
    monkeypatch.setenv(_extension.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(_extension, "PREBUILT_DIR", tmp_path / "package")
    monkeypatch.setattr(_extension, "_state", _extension._NOT_TRIED)
    monkeypatch.setattr(_extension, "_settings", None)
    monkeypatch.setattr(_extension, "entry_points", _extension.entry_points)
    monkeypatch.setattr(backend_selection, "_logged_fallbacks", set())
    monkeypatch.setattr(backend_selection, "_resolved", {})
    monkeypatch.setattr(backend_selection, "_setting", None)
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(backend_selection, "_environment", None)
    return tmp_path


@pytest.fixture
def no_compiler(fresh_extension, monkeypatch):
    """A machine whose C++ compiler ($CXX) does not exist; yields that compiler's path."""
    compiler = fresh_extension / "bin" / "no-such-c++"
    monkeypatch.setenv("CXX", str(compiler))
    return compiler


def copy_sources(destination: Path) -> Path:
    """A copy of the installed csrc/ sources in `destination`."""
    shutil.copytree(_extension.default_source_dir(), destination)
    return destination


# --------------------------------------------------------------------------------------------
# 1. Building and caching.


def test_the_extension_builds_here():
    """Where a compiler and ninja are, the extension must build and load (the other cpp tests
    skip when it cannot, so this one fails instead of letting a broken build pass quietly)."""
    missing = _extension._missing_tools(_extension.build_settings())
    if missing:
        pytest.skip(f"the extension cannot be built here: {missing}")
    assert unavailable_reason("cpp", "cpu") is None
    for op in ("lora_forward", "lora_backward", "adapter_forward", "adapter_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdelta_C::{op}", "CPU"), op


def test_a_second_process_reuses_the_cached_build(tmp_path):
    """A process that cannot compile (no compiler) still loads the build cached by this one."""
    if unavailable_reason("cpp", "cpu") is not None:
        pytest.skip(f"no cpp extension here: {unavailable_reason('cpp', 'cpu')}")
    settings = _extension.build_settings()
    if _extension.prebuilt_library(settings) is not None:
        pytest.skip("this process loaded setup.py's build, not a cached one")
    code = textwrap.dedent(f"""
        from pathlib import Path
        import fastdelta
        from fastdelta.ops import _extension
        _extension.PREBUILT_DIR = Path({str(tmp_path)!r})
        fastdelta.set_backend("cpp")
        print(_extension.build_directory(_extension.build_settings()))
    """)
    environment = {**os.environ, "CXX": str(tmp_path / "no-such-c++")}
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(_extension.build_directory(settings))


def test_the_cache_directory_comes_from_the_environment(monkeypatch, tmp_path):
    settings = _extension.build_settings()
    monkeypatch.setenv("FASTDELTA_CACHE", str(tmp_path / "mine"))
    assert _extension.build_directory(settings) == tmp_path / "mine" / "ext" / settings.key
    monkeypatch.delenv("FASTDELTA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _extension.cache_root() == tmp_path / "xdg" / "fastdelta"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _extension.cache_root() == tmp_path / "home" / ".cache" / "fastdelta"


def test_the_build_key_follows_the_sources_and_torch(monkeypatch, tmp_path):
    installed = _extension.build_settings()
    copy = copy_sources(tmp_path / "csrc")
    assert _extension.build_settings(copy).key == installed.key
    with (copy / "dropout.h").open("a") as header:
        header.write("// changed\n")
    changed = _extension.build_settings(copy).key
    assert changed != installed.key
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert _extension.build_settings(copy).key not in (changed, installed.key)


def test_setup_py_builds_are_found_by_their_key(monkeypatch, tmp_path):
    settings = _extension.build_settings()
    monkeypatch.setattr(_extension, "PREBUILT_DIR", tmp_path)
    (tmp_path / "_C_0123456789abcdef.cpython-311-x86_64-linux-gnu.so").touch()
    assert _extension.prebuilt_library(settings) is None  # another build's key: stale
    library = tmp_path / f"_C_{settings.key}.cpython-311-x86_64-linux-gnu.so"
    library.touch()
    assert _extension.prebuilt_library(settings) == library


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA here")
def test_a_cpu_only_torch_builds_no_cuda_kernels(monkeypatch):
    settings = _extension.build_settings()
    assert not settings.with_cuda and "without CUDA" in settings.no_cuda_reason
    assert all(path.suffix == ".cpp" for path in settings.sources)
    if unavailable_reason("cpp", "cpu") is not None:
        pytest.skip(f"no cpp extension here: {unavailable_reason('cpp', 'cpu')}")
    assert "built without CUDA kernels" in unavailable_reason("cpp", "cuda")
    # So where Triton cannot run either, a CUDA tensor's automatic backend is torch.
    monkeypatch.setattr(backend_selection, "_setting", None)
    monkeypatch.setattr(backend_selection, "_resolved", {})
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(backend_selection, "_triton_reason", lambda device: "no Triton (test)")
    assert resolve_backend("cuda", torch.float16) == "torch"


@pytest.fixture
def cpp_backend(monkeypatch):
    """The cpp backend forced (skipping where the extension is unavailable)."""
    if unavailable_reason("cpp", "cpu") is not None:
        pytest.skip(f"no cpp extension here: {unavailable_reason('cpp', 'cpu')}")
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(backend_selection, "_setting", "cpp")


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (/proc/cpuinfo), or None off x86-64 Linux."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_the_cpu_loops_run_the_widest_clone_this_cpu_has(cpp_backend):
    """The dropout loops of the CPU kernels are compiled for AVX-512, AVX2 and the baseline, and
    the loader picks one per CPU. An "arch=skylake-avx512" clone was picked by the CPU's model,
    so an AMD CPU with AVX-512 ran the AVX2 clone, hashing 3x slower; the clone is now picked by
    the CPU's features, which this checks against the flags the kernel reports."""
    isa = cpp_ops.cpu_vector_isa()
    flags = _cpu_flags()
    if flags is None:
        assert isa == "baseline"
    elif {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        assert isa in ("arch=x86-64-v4", "avx512f")
    elif "avx512f" in flags:  # AVX-512 without all of x86-64-v4's parts
        assert isa in ("avx512f", "avx2")
    else:
        assert isa == ("avx2" if "avx2" in flags else "baseline")


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_threads_give_one_threads_results(cpp_backend, dtype, dropout_p):
    """The CPU kernels split row blocks over at::parallel_for's threads, and their blocks call
    ATen (the suite itself runs on one thread): with parameters that require grad, two threads
    must give what one gives."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"x": (300, 40), "weight": (24, 40), "bias": (24,), "lora_A": (4, 40)}
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    tensors["lora_B"] = torch.randn(24, 4, generator=generator)
    grad = torch.randn(300, 24, generator=generator).to(dtype)
    seed = torch.tensor(7)

    def run_on(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            leaves = {n: t.to(dtype).requires_grad_() for n, t in tensors.items()}
            y = ops.lora_linear(*leaves.values(), 1.5, dropout_p, seed=seed)
            y.backward(grad)
        finally:
            torch.set_num_threads(previous)
        return [y.detach()] + [leaf.grad for leaf in leaves.values()]

    # Summing the per-thread partials of dA in another order may round bfloat16 the other way.
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for one, two in zip(run_on(1), run_on(2), strict=True):
        torch.testing.assert_close(two, one, **tolerance)


# --------------------------------------------------------------------------------------------
# 2. Failing well.


def test_without_a_compiler_forcing_cpp_says_so(no_compiler, monkeypatch):
    message = r"'cpp' backend cannot run here: .*no C\+\+ compiler was found: " + re.escape(
        repr(str(no_compiler))
    )
    with pytest.raises(RuntimeError, match=message):
        fastdelta.set_backend("cpp")
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "cpp")
    x, weight, lora_A, lora_B = (torch.randn(*shape) for shape in ((2, 3), (4, 3), (1, 3), (4, 1)))
    with pytest.raises(RuntimeError, match=r"'cpp' backend cannot run on cpu tensors here"):
        ops.lora_linear(x, weight, None, lora_A, lora_B, 1.0)


def test_without_a_compiler_the_automatic_choice_skips_cpp_and_warns(no_compiler, monkeypatch):
    # On a CUDA tensor where Triton cannot run, auto would take cpp; it falls back to torch.
    monkeypatch.setattr(backend_selection, "_triton_reason", lambda device: "no Triton (test)")
    with pytest.warns(UserWarning) as warnings:
        assert resolve_backend("cuda", torch.float32) == "torch"
        assert resolve_backend("cuda", torch.bfloat16) == "torch"
    assert len(warnings) == 1, [str(w.message) for w in warnings]  # once per reason
    message = str(warnings[0].message)
    assert "torch backend" in message and "no Triton (test)" in message
    assert "not built yet" in message and str(no_compiler) in message


@pytest.fixture
def no_build(fresh_extension, monkeypatch):
    """A machine where the extension is not built and building it would take minutes: a build
    fails the test."""

    def refuse(*arguments):
        pytest.fail("the C++ extension was built without being asked to")

    monkeypatch.setattr(_extension, "_compile", refuse)
    monkeypatch.setattr(backend_selection, "_triton_reason", lambda device: "no Triton (test)")


def test_auto_never_builds_the_extension_and_says_how_to(no_build):
    """`auto` on a CUDA tensor where Triton cannot run: no build inside a forward, a warning
    with the commands that build the extension, the torch backend meanwhile."""
    with pytest.warns(UserWarning, match="not built yet") as warnings:
        for dtype in (torch.float32, torch.float16, torch.float32):
            assert resolve_backend("cuda", dtype) == "torch"
    assert len(warnings) == 1
    message = str(warnings[0].message)
    assert "`fastdelta build-ext`" in message
    assert "FASTDELTA_BUILD_EXT=1 pip install --no-build-isolation ." in message
    assert _extension._state is _extension._NOT_TRIED  # a later forced cpp may still build it


def test_auto_uses_an_extension_that_is_built(no_build, monkeypatch):
    """A built extension (setup.py's or the cache's) is loaded, not built, and auto runs it."""
    library = _extension.PREBUILT_DIR / "_C_test.so"
    loaded = []
    monkeypatch.setattr(_extension, "built_library", lambda settings: library)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(_extension, "_import_entry_points", lambda library: None)
    monkeypatch.setattr(_extension, "cuda_kernels_reason", lambda: None)
    assert resolve_backend("cuda", torch.float16) == "cpp"
    assert loaded == [str(library)] and _extension._state is None


def test_forcing_cpp_still_builds_the_extension(no_build, monkeypatch):
    built = []

    def compile_extension(settings, directory):
        built.append(directory)
        return directory / "fastdelta_C.so"

    monkeypatch.setattr(_extension, "_compile", compile_extension)
    monkeypatch.setattr(_extension, "_missing_tools", lambda settings: None)
    fastdelta.set_backend("cpp")
    try:
        assert built == [_extension.build_directory(_extension.build_settings())]
    finally:
        fastdelta.set_backend("auto")


def test_missing_sources_are_named(fresh_extension, monkeypatch):
    empty = fresh_extension / "csrc"
    empty.mkdir()
    monkeypatch.setattr(_extension, "default_source_dir", lambda: empty)
    reason = unavailable_reason("cpp")
    assert f"C++ sources are missing from {empty}" in reason
    assert "ops.cpp" in reason and "reinstall fastdelta" in reason


def test_missing_ninja_is_named(fresh_extension, monkeypatch):
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "pip install ninja" in unavailable_reason("cpp")


def test_a_failed_compile_quotes_the_end_of_the_build_log(fresh_extension, monkeypatch):
    sources = fresh_extension / "csrc"
    for name in _extension.CPU_SOURCES:  # every unit fails at once: no real compile to wait for
        (sources / name).parent.mkdir(parents=True, exist_ok=True)
        (sources / name).write_text("#error broken on purpose by the fastdelta tests\n")
    monkeypatch.setattr(_extension, "default_source_dir", lambda: sources)
    missing = _extension._missing_tools(_extension.build_settings(sources))
    if missing:
        pytest.skip(f"nothing can be compiled here: {missing}")
    reason = unavailable_reason("cpp")
    assert "compiling it failed" in reason and "broken on purpose" in reason
    log = _extension.build_directory(_extension.build_settings(sources)) / "build.log"
    assert f"the whole log is in {log}" in reason and "broken on purpose" in log.read_text()
    message = r"(?s)'cpp' backend cannot run here: .*broken on purpose"
    with pytest.raises(RuntimeError, match=message):
        fastdelta.set_backend("cpp")


def test_import_fastdelta_works_without_a_compiler(tmp_path):
    """Even with FASTDELTA_BACKEND=cpp: the import never touches the extension, and the first op
    says what is missing."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        import torch
        import fastdelta
        from fastdelta.ops import _extension
        _extension.PREBUILT_DIR = Path({str(tmp_path)!r})
        try:
            shapes = ((2, 3), (4, 3), (1, 3), (4, 1))
            x, weight, lora_A, lora_B = (torch.randn(*shape) for shape in shapes)
            fastdelta.ops.lora_linear(x, weight, None, lora_A, lora_B, 1.0)
        except RuntimeError as error:
            print(error)
    """)
    environment = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-c++"),
        "FASTDELTA_CACHE": str(tmp_path / "cache"),
        ENVIRONMENT_VARIABLE: "cpp",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "'cpp' backend cannot run on cpu tensors here" in result.stdout
    assert "no C++ compiler was found" in result.stdout


# --------------------------------------------------------------------------------------------
# 3. The CUDA sources compile, GPU or not.

# The GPUs the CUDA kernels are compiled and audited for: Ampere, the oldest GPU the fused kernels
# aim at, and Hopper.
NVCC_TARGETS = ("sm_80", "sm_90")
# The static shared memory a block may declare: ptxas refuses more on both targets ("uses too
# much shared data (0xc000 max)"). The larger per-block maxima, 163 KiB on sm_80 and 227 KiB on
# sm_90, are for dynamic shared memory with an opt-in, which no launch of the extension uses.
STATIC_SHARED_MEMORY_LIMIT = 48 * 1024


def nvcc_command(source: Path, output: Path) -> list[str]:
    """nvcc -c on one CUDA source with the flags torch's cpp_extension gives an extension (its
    include paths and defines, its C++ standard, and for .cu files COMMON_NVCC_FLAGS) and the
    extension's own; a .cu file's device code for every NVCC_TARGETS, with ptxas's resource
    report (-Xptxas -v). nvcc hands a .cpp file to the host compiler with CUDA's include path."""
    version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    standard = "-std=c++20" if version >= (2, 13) else "-std=c++17"  # as torch's cpp_extension
    includes = [*cpp_extension.include_paths(), sysconfig.get_path("include")]
    flags = [
        *(flag for path in includes for flag in ("-isystem", path)),
        f"-DTORCH_EXTENSION_NAME={_extension.LIBRARY}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        standard,
    ]
    # A CPU-only torch ships c10/cuda's headers without the one its CUDA build generates (it
    # only defines a Windows export macro); this define skips it, as torch's HIP build does.
    generated = Path(includes[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not generated.is_file():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    if source.suffix == ".cu":
        flags += [*cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC"]
        flags += [*_extension.NVCC_FLAGS, "-Xptxas", "-v"]
        flags += [f"-gencode=arch=compute_{target[3:]},code={target}" for target in NVCC_TARGETS]
    else:
        flags += ["--compiler-options", ",".join(["-fPIC", *_extension.CXX_FLAGS])]
    return ["nvcc", "-c", str(source), "-o", str(output), *flags]


@dataclass(frozen=True)
class KernelResources:
    """What ptxas -v reports of one function for one target. registers is None for a device
    function that was not inlined (ptxas gives only its frame)."""

    function: str  # mangled
    target: str
    registers: int | None = None
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_memory: int = 0  # static, bytes

    def problems(self) -> list[str]:
        """Spills, local memory and shared memory past the limit, in words."""
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills {self.spill_stores} / {self.spill_loads} bytes (stores / loads)")
        if self.stack_frame:
            found.append(f"a {self.stack_frame}-byte stack frame in local memory")
        if self.shared_memory > STATIC_SHARED_MEMORY_LIMIT:
            found.append(f"{self.shared_memory} bytes of static shared memory")
        return found


PTXAS_ENTRY = re.compile(r"Compiling entry function '(?P<function>[^']+)' for '(?P<target>sm_\w+)'")
PTXAS_PROPERTIES = re.compile(r"Function properties for (?P<function>\S+)")
PTXAS_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads"
)
PTXAS_USAGE = re.compile(r"Used (?P<registers>\d+) registers")
PTXAS_SHARED = re.compile(r"(?P<bytes>\d+) bytes smem")
PTXAS_CUMULATIVE_STACK = re.compile(r"(?P<bytes>\d+) bytes cumulative stack size")


def parse_ptxas(log: str) -> list[KernelResources]:
    """Every function in a ptxas -v report. A kernel's lines: "Compiling entry function 'f' for
    'sm_80'", "Function properties for f", its frame ("N bytes stack frame, N bytes spill
    stores, N bytes spill loads"), "Used N registers, ..., N bytes smem, ...". A device function
    that is not inlined has a properties line and a frame line of its own; a kernel's stack
    frame is taken as its cumulative stack size, its callees' frames included, when larger."""
    found: dict[tuple[str, str], KernelResources] = {}
    entry = function = target = None
    for line in log.splitlines():
        if match := PTXAS_ENTRY.search(line):
            entry = function = match["function"]
            target = match["target"]
            found[entry, target] = KernelResources(entry, target)
        elif (match := PTXAS_PROPERTIES.search(line)) and target is not None:
            function = match["function"]
            found.setdefault((function, target), KernelResources(function, target))
        elif (match := PTXAS_FRAME.search(line)) and function is not None:
            frame = {"stack_frame": "stack", "spill_stores": "stores", "spill_loads": "loads"}
            counts = {field: int(match[group]) for field, group in frame.items()}
            found[function, target] = replace(found[function, target], **counts)
        elif (match := PTXAS_USAGE.search(line)) and entry is not None:
            shared = PTXAS_SHARED.search(line)
            stack = PTXAS_CUMULATIVE_STACK.search(line)
            kernel = found[entry, target]
            found[entry, target] = replace(
                kernel,
                registers=int(match["registers"]),
                shared_memory=int(shared["bytes"]) if shared else 0,
                stack_frame=max(kernel.stack_frame, int(stack["bytes"]) if stack else 0),
            )
    return list(found.values())


def readable_names(mangled: set[str]) -> dict[str, str]:
    """c++filt's names, without the namespaces, the return type and the parameter list (the
    mangled names where c++filt is missing)."""
    names = sorted(mangled)
    if shutil.which("c++filt") is None:
        return {name: name for name in names}
    output = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    readable = {}
    for name, demangled in zip(names, output.stdout.splitlines(), strict=True):
        for noise in ("(anonymous namespace)::", "fastdelta::cuda::", "fastdelta::", "c10::"):
            demangled = demangled.replace(noise, "")
        demangled = demangled.removeprefix("void ")
        depth = 0  # cut the parameter list at the "(" that matches the last ")"
        for index in range(len(demangled) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(demangled[index], 0)
            if depth == 0:
                demangled = demangled[:index] or demangled
                break
        readable[name] = demangled
    return readable


def resource_table(kernels: list[KernelResources]) -> str:
    """One line per kernel and target: registers, spill bytes (stores / loads), stack frame and
    static shared memory bytes."""
    names = readable_names({kernel.function for kernel in kernels})
    rows = [("kernel", "target", "registers", "spills", "stack", "smem")]
    for kernel in sorted(kernels, key=lambda kernel: (names[kernel.function], kernel.target)):
        registers = "-" if kernel.registers is None else str(kernel.registers)
        spills = f"{kernel.spill_stores}/{kernel.spill_loads}"
        numbers = (registers, spills, str(kernel.stack_frame), str(kernel.shared_memory))
        rows.append((names[kernel.function], kernel.target, *numbers))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory) -> dict[str, dict]:
    """{source: {"returncode", "object_bytes", "log"}} of nvcc on every source of the CUDA build:
    the kernels (.cu, with ptxas's report) and the op code that includes c10's CUDA headers
    (.cpp), two at a time (70 s of CPU time: 35-40 s on two idle cores). A clean compile's
    results are kept in the cache directory under a hash of the sources, the commands and
    nvcc's version, so unchanged sources are not compiled again on this machine."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    source_dir = _extension.default_source_dir()
    files = _extension.HEADERS + _extension.CUDA_SOURCES + _extension.CUDA_HEADERS
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(version.encode())
    for name in sorted(files):
        digest.update(name.encode() + (source_dir / name).read_bytes())
    for name in _extension.CUDA_SOURCES:
        digest.update(" ".join(nvcc_command(Path(name), Path("out.o"))).encode())
    cached = _extension.cache_root() / "nvcc-check" / f"{digest.hexdigest()[:16]}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    directory = tmp_path_factory.mktemp("nvcc")

    def compile_one(name):
        output = directory / (Path(name).name + ".o")
        command = nvcc_command(source_dir / name, output)
        result = subprocess.run(command, capture_output=True, text=True)
        size = output.stat().st_size if output.is_file() else 0
        log = result.stdout + result.stderr
        return name, {"returncode": result.returncode, "object_bytes": size, "log": log}

    # The kernels first: adapter_kernels.cu, compiled for both targets, is the longest job.
    names = sorted(_extension.CUDA_SOURCES, key=lambda name: not name.endswith(".cu"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(compile_one, names))
    if all(result["returncode"] == 0 and result["object_bytes"] for result in results.values()):
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(results))
    return results


def test_nvcc_compiles_the_cuda_sources(nvcc_results):
    """Every source of the CUDA build compiles to an object, GPU or not."""
    for name, result in nvcc_results.items():
        assert result["returncode"] == 0, f"nvcc failed on {name}:\n{result['log']}"
        assert result["object_bytes"] > 0, name


def test_ptxas_no_kernel_spills_or_exceeds_shared_memory(nvcc_results):
    """ptxas's report on every kernel for sm_80 and sm_90: no register spills, no stack frame
    (local memory, where spills and arrays indexed at run time go), static shared memory within
    a block's limit. `pytest -k ptxas -s` prints the table; a failure prints it too."""
    kernels = []
    for name, result in nvcc_results.items():
        if name.endswith(".cu"):
            assert result["returncode"] == 0, f"nvcc failed on {name}:\n{result['log']}"
            found = parse_ptxas(result["log"])
            targets = {kernel.target for kernel in found}
            assert targets == set(NVCC_TARGETS), f"ptxas reported {targets} for {name}"
            kernels += found
    table = resource_table(kernels)
    print(f"\nptxas -v on csrc/cuda/*.cu, {len(kernels)} functions x targets:\n{table}")
    names = readable_names({kernel.function for kernel in kernels})
    problems = [
        f"{names[kernel.function]} ({kernel.target}): {', '.join(kernel.problems())}"
        for kernel in kernels
        if kernel.problems()
    ]
    assert not problems, "\n".join(problems) + f"\n\n{table}"


# --------------------------------------------------------------------------------------------
# 4. On a GPU.


@pytest.mark.gpu
@needs_cuda
def test_gpu_the_extension_has_cuda_kernels():
    if _extension.cuda_toolkit_reason():
        pytest.skip(f"no CUDA kernels can be built here: {_extension.cuda_toolkit_reason()}")
    assert unavailable_reason("cpp", "cuda") is None
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastdelta_C::lora_forward", "CUDA")


@pytest.mark.gpu
@needs_cuda
def test_gpu_float64_is_float64_exact(monkeypatch):
    """Float64 runs through the CUDA kernels too (accumulated in float64)."""
    if unavailable_reason("cpp", "cuda") is not None:
        pytest.skip(f"the cpp backend cannot run on CUDA here: {unavailable_reason('cpp', 'cuda')}")
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(backend_selection, "_setting", "cpp")
    generator = torch.Generator().manual_seed(0)
    shapes = {"x": (300, 7), "weight": (5, 7), "bias": (5,), "lora_A": (2, 7), "lora_B": (5, 2)}
    shapes |= {"h": (300, 7), "down": (3, 7), "down_bias": (3,), "up": (7, 3), "up_bias": (7,)}
    tensors = {
        name: torch.randn(shape, generator=generator, dtype=torch.float64)
        for name, shape in shapes.items()
    }
    lora = ("x", "weight", "bias", "lora_A", "lora_B")
    adapter = ("h", "down", "down_bias", "up", "up_bias")

    def results(device, fused):
        leaves = {n: t.to(device).requires_grad_() for n, t in tensors.items()}
        if fused:
            y = ops.lora_linear(*(leaves[n] for n in lora), 1.5)
            out = ops.adapter_bottleneck(*(leaves[n] for n in adapter), 0.5, "gelu")
        else:
            y = reference.lora_linear(*(leaves[n] for n in lora), 1.5)
            out = reference.adapter_bottleneck(*(leaves[n] for n in adapter), 0.5, "gelu")
        (y.square().sum() + out.square().sum()).backward()
        grads = [leaf.grad.cpu() for leaf in leaves.values()]
        return [y.detach().cpu(), out.detach().cpu(), *grads]

    for got, expected in zip(results("cuda", True), results("cpu", False), strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
