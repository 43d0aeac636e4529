import os
import pathlib
import sys

import pytest
import torch

# Without a GPU, Triton's interpreter runs the kernels on CPU tensors, so CI checks them too.
# Triton reads this when the kernels are defined, so it is set before fastdelta is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests check the kernels themselves. First-use verification (fastdelta.ops.verification,
# on by default on CUDA) would move a wrong kernel's variant to another backend, and a test of
# that kernel would then pass on the other backend's results; test_verification.py turns it on.
os.environ.setdefault("FASTDELTA_VERIFY", "0")

sys.path.insert(0, str(pathlib.Path(__file__).parent))

# The test models are tiny: extra OpenMP threads only contend for this machine's two cores
# (measured: a delta-model test file took 21-38 s with two threads under load, 8.5 s with one).
torch.set_num_threads(1)


@pytest.fixture
def use_backend(monkeypatch):
    """A function that forces a backend (skipping the test where it cannot run on `device`).

    Afterwards the setting goes back to "auto", then to whatever it was before the test (None
    unless someone set it), and $FASTDELTA_BACKEND is unset during the test.
    """
    from fastdelta.ops import backend as backend_selection

    monkeypatch.delenv(backend_selection.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(backend_selection, "_setting", backend_selection._setting)

    def use(name: str, device: str = "cpu"):
        reason = None if name == "auto" else backend_selection.unavailable_reason(name, device)
        if reason:
            pytest.skip(f"the {name} backend cannot run on {device} here: {reason}")
        backend_selection.set_backend(name)
        return backend_selection.backend_module(name)

    yield use
    backend_selection.set_backend("auto")
