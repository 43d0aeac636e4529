import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

# The test models are tiny: extra OpenMP threads only contend for this machine's two cores
# (measured: a delta-model test file took 21-38 s with two threads under load, 8.5 s with one).
torch.set_num_threads(1)
