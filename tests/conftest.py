import os
import pathlib
import sys

import torch

# Without a GPU, Triton's interpreter runs the kernels on CPU tensors, so CI checks them too.
# Triton reads this when the kernels are defined, so it is set before fastdelta is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(pathlib.Path(__file__).parent))

# The test models are tiny: extra OpenMP threads only contend for this machine's two cores
# (measured: a delta-model test file took 21-38 s with two threads under load, 8.5 s with one).
torch.set_num_threads(1)
