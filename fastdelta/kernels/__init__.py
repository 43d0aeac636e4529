"""Triton kernels of fastdelta, installed as the package `fastdelta.kernels`.

This package is the "triton" backend: it provides the same functions as
`fastdelta.ops.torch_backend`, computed by fused kernels.
"""

from ._common import INTERPRETED
from .adapter import adapter_backward, adapter_forward
from .dora import dora_backward, dora_forward
from .lora import dropout_keep_mask, lora_forward
from .lora_backward import lora_backward
from .multi_lora import multi_lora_forward
from .multi_lora_backward import multi_lora_backward

__all__ = [
    "INTERPRETED",
    "adapter_backward",
    "adapter_forward",
    "dora_backward",
    "dora_forward",
    "dropout_keep_mask",
    "lora_backward",
    "lora_forward",
    "multi_lora_backward",
    "multi_lora_forward",
]
