"""Building and loading `fastdelta_C`, the C++/CUDA extension behind the cpp backend.

The extension is looked for, in order: built by setup.py (`FASTDELTA_BUILD_EXT=1 pip install
...`) next to this package as `fastdelta/_C_<key>*.so`; built before into the cache directory
`$FASTDELTA_CACHE/ext/<key>` (by default `~/.cache/fastdelta/ext/<key>`); else compiled there
now, once, with `torch.utils.cpp_extension.load` and ninja. <key> is a hash of the sources, the
build flags, the torch version, the Python ABI and whether CUDA kernels are built, so a changed
source or an upgraded torch never loads a stale build.

CUDA kernels are built when torch was built with CUDA and a CUDA toolkit (nvcc) is found;
otherwise the extension has CPU kernels only. A missing compiler or a failed build never
raises on import: `unavailable_reason()` says what is missing, and the backend selection skips
or refuses the cpp backend with that reason.

This module imports nothing from fastdelta at module level: setup.py loads it by path to build
the same sources with the same flags.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

LIBRARY = "fastdelta_C"
CACHE_VARIABLE = "FASTDELTA_CACHE"
# Lines of a failed build's log quoted in the error; the whole log stays in the build directory.
LOG_TAIL_LINES = 25
# The file in a build directory that names the library once the build is complete.
COMPLETE_MARKER = "complete"

CPU_SOURCES = (
    "ops.cpp",
    "autograd.cpp",
    "multi_lora.cpp",
    "python.cpp",
    "cpu/lora.cpp",
    "cpu/adapter.cpp",
)
# The CUDA ops: ATen-level code in .cpp files (host compiler), kernels in .cu files (nvcc).
CUDA_SOURCES = (
    "cuda/lora_cuda.cpp",
    "cuda/adapter_cuda.cpp",
    "cuda/lora_kernels.cu",
    "cuda/adapter_kernels.cu",
)
HEADERS = ("host_device.h", "common.h", "dispatch.h", "dropout.h", "activations.h")
CUDA_HEADERS = ("cuda/launch.h", "cuda/tensor_args.h", "cuda/tile_matmul.cuh")
# -fopenmp: at::parallel_for is an inline OpenMP loop, serial when compiled without it.
CXX_FLAGS = ("-O3", "-fopenmp")
NVCC_FLAGS = ("-O3", "-lineinfo")
LINK_FLAGS = ("-fopenmp",)


class ExtensionUnavailable(RuntimeError):
    """The C++ extension cannot be built or loaded here; the message says what is missing."""


@dataclass(frozen=True)
class BuildSettings:
    """What one build of the extension compiles, and the key that names the build."""

    source_dir: Path
    with_cuda: bool
    no_cuda_reason: str | None
    key: str

    @property
    def sources(self) -> list[Path]:
        """The translation units to compile (the .cu files only with CUDA)."""
        names = CPU_SOURCES + (CUDA_SOURCES if self.with_cuda else ())
        return [self.source_dir / name for name in names]


def _build_files(with_cuda: bool) -> tuple[str, ...]:
    """Every file a build reads: its translation units and their headers."""
    if with_cuda:
        return CPU_SOURCES + HEADERS + CUDA_SOURCES + CUDA_HEADERS
    return CPU_SOURCES + HEADERS


def cuda_toolkit_reason() -> str | None:
    """Why CUDA kernels would not be built here (None when they would)."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return (
            "no CUDA toolkit (nvcc) was found; install one and set CUDA_HOME to it, and the "
            "next process builds the CUDA kernels"
        )
    return None


def build_settings(source_dir: Path | None = None) -> BuildSettings:
    """The settings of the build for this torch and these sources (by default the installed
    `fastdelta.csrc` package)."""
    source_dir = default_source_dir() if source_dir is None else Path(source_dir)
    no_cuda_reason = cuda_toolkit_reason()
    with_cuda = no_cuda_reason is None
    digest = hashlib.sha256()
    for name in sorted(_build_files(with_cuda)):
        path = source_dir / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    for part in (torch.__version__, sys.implementation.cache_tag, str(with_cuda)):
        digest.update(part.encode())
    digest.update(" ".join(CXX_FLAGS + NVCC_FLAGS + LINK_FLAGS).encode())
    return BuildSettings(source_dir, with_cuda, no_cuda_reason, digest.hexdigest()[:16])


def default_source_dir() -> Path:
    """Where the installed sources are: the `fastdelta.csrc` package (csrc/ in the repository)."""
    from fastdelta import csrc

    return Path(csrc.__file__).parent


def cache_root() -> Path:
    """$FASTDELTA_CACHE, else $XDG_CACHE_HOME/fastdelta, else ~/.cache/fastdelta."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastdelta"


def build_directory(settings: BuildSettings) -> Path:
    """The cache directory of this build."""
    return cache_root() / "ext" / settings.key


def prebuilt_name(settings: BuildSettings) -> str:
    """The module name setup.py gives the extension it builds: fastdelta._C_<key>."""
    return f"_C_{settings.key}"


# The package directory holding setup.py's build (tests point it elsewhere).
PREBUILT_DIR = Path(__file__).resolve().parents[1]


def prebuilt_library(settings: BuildSettings) -> Path | None:
    """setup.py's build of these sources for this torch, if there is one."""
    matches = sorted(PREBUILT_DIR.glob(prebuilt_name(settings) + "*.so"))
    return matches[0] if matches else None


def _missing_tools(settings: BuildSettings) -> str | None:
    from torch.utils import cpp_extension

    missing = [path.name for path in settings.sources if not path.is_file()]
    if missing:
        return (
            f"its C++ sources are missing from {settings.source_dir} ({', '.join(missing)}); "
            "reinstall fastdelta from its repository or source distribution"
        )
    compiler = (shlex.split(os.environ.get("CXX", "")) or ["c++"])[0]
    if shutil.which(compiler) is None:
        return (
            f"no C++ compiler was found: {compiler!r} (from $CXX, else c++) is not on PATH; "
            "install g++ or clang (e.g. apt-get install g++), or set CXX"
        )
    if not cpp_extension.is_ninja_available():
        return "ninja, which builds it, is not installed: pip install ninja"
    return None


def _log_tail(log: str) -> str:
    lines = [line for line in log.splitlines() if line.strip()]
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _compile(settings: BuildSettings, directory: Path) -> Path:
    """Compile the extension into `directory` and load it (its entry points too); raise
    ExtensionUnavailable with the tail of the build log when that fails."""
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    # A warning, so that the first call's minute or two of compiling does not pass unexplained.
    logger.warning("Compiling fastdelta's C++ extension (once, a minute or two) in %s", directory)
    try:
        # The returned path is usually directory/fastdelta_C.so; torch names a second build of
        # other sources in the same process fastdelta_C_v1.so.
        library = cpp_extension.load(
            name=LIBRARY,
            sources=[str(path) for path in settings.sources],
            extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=list(NVCC_FLAGS),
            extra_ldflags=list(LINK_FLAGS),
            build_directory=str(directory),
            with_cuda=settings.with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as error:
        log_path = directory / "build.log"
        log_path.write_text(str(error))
        logger.warning("Compiling fastdelta's C++ extension failed; see %s", log_path)
        raise ExtensionUnavailable(
            f"compiling it failed (the whole log is in {log_path}); the log ends:\n"
            f"{_log_tail(str(error))}"
        ) from error
    library = Path(library)
    _import_entry_points(library)
    # Written last: a build directory without it is not (yet) a complete build.
    (directory / COMPLETE_MARKER).write_text(library.name)
    return library


def built_library(settings: BuildSettings) -> Path | None:
    """A complete build of these settings, setup.py's or the cache's, if there is one."""
    library = prebuilt_library(settings)
    if library is not None:
        return library
    directory = build_directory(settings)
    marker = directory / COMPLETE_MARKER
    if marker.is_file() and (directory / marker.read_text()).is_file():
        return directory / marker.read_text()
    return None


def _load(settings: BuildSettings) -> Path:
    """Find, or build, and load the extension; return the library's path."""
    library = built_library(settings)
    if library is None:
        problem = _missing_tools(settings)
        if problem:
            raise ExtensionUnavailable(problem)
        return _compile(settings, build_directory(settings))
    _load_library(library)
    return library


def _load_library(library: Path) -> None:
    """Load a built library: its ops into torch.ops, and its Python entry points."""
    torch.ops.load_library(str(library))
    _import_entry_points(library)


def _import_entry_points(library: Path) -> None:
    """Import the Python module of the loaded library: its functions call the differentiable ops
    with less host time than torch.ops does (see csrc/python.cpp)."""
    global entry_points
    loader = importlib.machinery.ExtensionFileLoader(LIBRARY, str(library))
    spec = importlib.util.spec_from_file_location(LIBRARY, str(library), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    entry_points = module


_NOT_TRIED = object()
_state: object | str | None = _NOT_TRIED  # None once loaded, else why not
# The extension's Python module (csrc/python.cpp), once it is loaded.
entry_points = None
_settings: BuildSettings | None = None


def unavailable_reason() -> str | None:
    """Why the extension cannot be used in this process (None once it is loaded). The first
    call finds, builds or loads it; the answer is kept."""
    global _state, _settings
    if _state is _NOT_TRIED:
        try:
            _settings = build_settings()
            path = _load(_settings)
        except (ExtensionUnavailable, OSError, ImportError, RuntimeError) as error:
            _state = f"the C++ extension ({LIBRARY}) is unavailable: {error}"
        else:
            logger.debug("Loaded %s from %s", LIBRARY, path)
            _state = None
    return _state  # type: ignore[return-value]


# The commands that build the extension ahead of its first use.
BUILD_COMMANDS = (
    "`fastdelta build-ext` (into the cache directory), or "
    "`FASTDELTA_BUILD_EXT=1 pip install --no-build-isolation .` in a fastdelta checkout"
)


def unbuilt_reason() -> str | None:
    """Like unavailable_reason(), but never compiles: a build that exists is loaded (None is
    returned then), a missing one is named with the command that builds it, and a later
    unavailable_reason() may still build it."""
    global _state, _settings
    if _state is not _NOT_TRIED:
        return _state  # type: ignore[return-value]
    try:
        settings = build_settings()
        library = built_library(settings)
    except (OSError, ImportError) as error:
        return f"the C++ extension ({LIBRARY}) is unavailable: {error}"
    if library is None:
        problem = _missing_tools(settings)
        needs = f"; building it needs what is missing here: {problem}" if problem else ""
        return (
            f"the C++ extension ({LIBRARY}) is not built yet{needs}. Build it once, a minute or "
            f"two, with {BUILD_COMMANDS}"
        )
    try:
        _load_library(library)
    except (OSError, RuntimeError, ImportError) as error:
        _state = f"the C++ extension ({LIBRARY}) is unavailable: loading {library} failed: {error}"
    else:
        logger.debug("Loaded %s from %s", LIBRARY, library)
        _settings, _state = settings, None
    return _state  # type: ignore[return-value]


def build_key() -> str | None:
    """The key of the loaded build (a hash of its sources, flags and torch), None before."""
    return None if _settings is None else _settings.key


def require() -> None:
    """Load the extension, or raise ExtensionUnavailable saying why it cannot be."""
    reason = unavailable_reason()
    if reason:
        raise ExtensionUnavailable(reason)


def cuda_kernels_reason() -> str | None:
    """Why the loaded extension has no CUDA kernels (None when it has them)."""
    require()
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIBRARY}::lora_forward", "CUDA"):
        return None
    reason = _settings.no_cuda_reason if _settings else None
    return f"the C++ extension was built without CUDA kernels ({reason or 'a CPU-only build'})"
