"""The constant part of a DoRA layer's norm, kept between forwards.

||W + s B A||^2 of a row is ||W||^2 + 2 s <W A^T, B> + s^2 <B A A^T, B>: only the first term is
the frozen weight's alone, and it is the one that takes a float32 pass over all of W (for a
bfloat16 weight, a float32 copy of it and of its square); the others cost a product of W with A
([N, K] by [K, r]) and [N, r]-sized work. So the layer keeps ||W||^2 and computes the rest each
forward (`fastdelta.ops.dora_weight_norm`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fastdelta import ops
from fastdelta.ops.eager import runs_reference

_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


class BaseRowNorms:
    """||W||^2 of each output row of one host weight, [N] float32, kept for that tensor at that
    version: an in-place change (merge, unmerge, an optimizer step on a trainable W,
    load_state_dict) bumps its version, `.to()` and `.data =` give it new storage, and another
    weight (a deepcopy's, a DataParallel replica's) is another tensor, so each computes it again.
    Under torch.compile and torch.func transforms, for tensor subclasses and for inference
    tensors (which have no version) it is computed every call. Never pickled or copied: a copy
    starts empty. A write through `weight.data` bypasses the version counter (as it bypasses
    autograd), so change a DoRA host's weight through the parameter itself, under
    torch.no_grad(), as load_state_dict and the optimizers do."""

    def __init__(self) -> None:
        # (weak reference to the weight, what identifies its value, ||W||^2), set at once so
        # that threads sharing the layer (DataParallel replicas) never see half an entry.
        self._entry: tuple | None = None

    def get(self, weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        """||W||^2 of each output row of `weight` ([N, K], or [K, N] with fan_in_fan_out)."""
        if (
            torch.compiler.is_compiling()
            or type(weight) not in _PLAIN_TYPES
            or weight.is_inference()
            or runs_reference()  # torch.func's wrapped tensors have no storage to key on
        ):
            with torch.no_grad():
                return ops.dora_row_norms_squared(weight, fan_in_fan_out)
        key = (
            weight._version, weight.data_ptr(), weight.dtype, weight.device, weight.shape,
            fan_in_fan_out,
        )  # fmt: skip
        entry = self._entry
        if entry is not None and entry[0]() is weight and entry[1] == key:
            return entry[2]
        with torch.no_grad():
            value = ops.dora_row_norms_squared(weight, fan_in_fan_out)
        self._entry = (weakref.ref(weight), key, value)
        return value

    def __getstate__(self) -> dict:
        return {"_entry": None}

    def __deepcopy__(self, memo: dict) -> BaseRowNorms:
        return BaseRowNorms()
