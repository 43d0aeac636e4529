"""Packaging for fastdelta.

`kernels/` is a top-level folder in the repository but installs as `fastdelta.kernels`, so no
top-level package called `kernels` is ever installed.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
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
    packages=[*find_packages(include=["fastdelta", "fastdelta.*"]), "fastdelta.kernels"],
    package_dir={"fastdelta.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors",
        "rich",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "peft", "ruff"],
    },
    license="Apache-2.0",
)
