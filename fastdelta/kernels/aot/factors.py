"""The grid's factors: each launcher's arguments as factors, each a tuple of values, the first
the base; and a Case, one call of a launcher with a value of each of its factors."""

from __future__ import annotations

import dataclasses
import itertools

import torch

# dtype label -> (torch dtype, torch.backends.cuda.matmul.allow_tf32, which sets dot precision).
DTYPES = {
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "fp32-tf32": (torch.float32, True),
    "fp32-ieee": (torch.float32, False),
}
# Rows: training, decode (M=1, its own specialization), small (the one-launch LoRA forward).
ROWS = (4096, 1, 13)
# Sizes divisible by 16 (128-bit loads) and odd ones (narrower loads, masked edges).
IN_FEATURES = (1024, 1023)
OUT_FEATURES = (4096, 1025)
# LoRA ranks: 1 (specialized as a constant), below 16 (a masked rank tile), the tile sizes, and
# 512, split into rank chunks.
LORA_RANKS = (16, 1, 8, 32, 64, 128, 256, 512)
# Adapter bottlenecks: 24 (the default), tiles up to the fused limit 256, 129-256 (one 256 tile),
# and above it (the chunked path).
BOTTLENECKS = (24, 8, 64, 128, 200, 256, 512)
ACTIVATIONS = ("gelu_new", "relu", "gelu", "silu")
# The gradients needed: LoRA (x, A, B); DoRA (x, A, B, b, magnitude); adapter (h, D, b_d, U,
# b_u). At least one.
LORA_NEEDS = tuple(n for n in itertools.product((True, False), repeat=3) if any(n))
DORA_NEEDS = tuple(n for n in itertools.product((True, False), repeat=5) if any(n))
ADAPTER_NEEDS = tuple(n for n in itertools.product((True, False), repeat=5) if any(n))

# Adapters stacked in a mixed-batch LoRA: several, one, and more than 16 (the kernels' vector of
# segment starts is 16 wide up to 16 adapters, wider beyond).
MULTI_LORA_ADAPTERS = (4, 1, 40)

# The factors every LoRA launcher has, then every adapter launcher (in grid order).
_LORA_SHAPES = {
    "dtype": tuple(DTYPES),
    "m": ROWS,
    "k": IN_FEATURES,
    "n": OUT_FEATURES,
    "rank": LORA_RANKS,
    "dropout": (True, False),
}
_ADAPTER_SHAPES = {
    "dtype": tuple(DTYPES),
    "m": ROWS,
    "d_in": IN_FEATURES,
    "d_out": OUT_FEATURES,  # parallel adapters; a sequential one has d_out = d_in
    "rank": BOTTLENECKS,
    "activation": ACTIVATIONS,
}

FACTORS = {
    "lora_forward": {**_LORA_SHAPES, "bias": (True, False), "fan_in_fan_out": (False, True)},
    "lora_backward": {
        **_LORA_SHAPES,
        "fan_in_fan_out": (False, True),
        "needs": LORA_NEEDS,
        "grad": ("contiguous", "expanded"),  # y.sum().backward() sends a stride-0 gradient
    },
    # DoRA: LoRA's launches with the column scale (and z kept for the magnitude's gradient),
    # and the backward's scaling pass; exact_norm adds ATen products only.
    "dora_forward": {
        **_LORA_SHAPES,
        "bias": (True, False),
        "fan_in_fan_out": (False, True),
        "keep_z": (True, False),
    },
    "dora_backward": {
        **_LORA_SHAPES,
        "fan_in_fan_out": (False, True),
        "needs": DORA_NEEDS,
        "grad": ("contiguous", "expanded"),
    },
    # Mixed-batch LoRA: its base product is cuBLAS's, so the bias and the layout launch nothing
    # of its own.
    "multi_lora_forward": {**_LORA_SHAPES, "adapters": MULTI_LORA_ADAPTERS},
    "multi_lora_backward": {
        **_LORA_SHAPES,
        "adapters": MULTI_LORA_ADAPTERS,
        "needs": LORA_NEEDS,
        "grad": ("contiguous", "expanded"),
    },
    "adapter_forward": {
        **_ADAPTER_SHAPES,
        "down_bias": (True, False),
        "up_bias": (True, False),
        "sequential": (True, False),
    },
    "adapter_backward": {**_ADAPTER_SHAPES, "sequential": (True, False), "needs": ADAPTER_NEEDS},
    "dropout_keep_mask": {"m": ROWS, "k": IN_FEATURES},
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a launcher: its name and its arguments, (factor, value) pairs."""

    op: str
    params: tuple

    @property
    def arguments(self) -> dict:
        return dict(self.params)

    @property
    def dtype(self) -> str:
        return self.arguments.get("dtype", "-")

    @property
    def label(self) -> str:
        return f"{self.op}({', '.join(f'{k}={_text(v)}' for k, v in self.params)})"


def _text(value) -> str:
    """A value in a case label: gradients needed as 0/1 digits."""
    return "".join("1" if v else "0" for v in value) if isinstance(value, tuple) else str(value)
