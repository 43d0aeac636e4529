"""The weights of a layer's named LoRAs as the mixed-batch op takes them (`ops.multi_lora_linear`):
lora_A [n, r, K] and lora_B [n, N, r] stacked, lower ranks zero-padded, and the scalings [n].

Stacking copies the factors (a [n, r, K] and a [n, N, r] tensor per call: about 2 MiB for 16
rank-16 LoRAs on a 1024-wide layer, a fraction of a millisecond on a CPU against tens for the
layer's GEMM). While the factors train they are stacked per call, differentiably, since the
stack of a previous step would hold old values and a freed graph; otherwise (no_grad, frozen
weights) the stacks are kept per layer and set of names, until a factor changes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from fastdelta import ops
from fastdelta.layers.base import parameter


@dataclass
class _Stack:
    tensors: tuple[torch.Tensor, ...]
    versions: tuple[tuple[int, int], ...]
    lora_A: torch.Tensor
    lora_B: torch.Tensor


# host -> {names: the stacks of those names' LoRA weights}, kept while the weights do not train.
_stacks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# host -> {(names, device): the scalings tensor}.
_scalings_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stacked_weights(host, names, deltas) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A [n, r, K] and lora_B [n, N, r] of `deltas`. Stacked per call (and differentiable)
    while a weight can get a gradient; else kept, keyed by the weights themselves, their version
    counters and storage: an in-place change through the parameter (an optimizer step,
    load_state_dict, hot_swap) or a move restacks. A write through `.data` is not seen."""
    lora_As = [parameter(delta, "lora_A") for delta in deltas]
    lora_Bs = [parameter(delta, "lora_B") for delta in deltas]
    tensors = (*lora_As, *lora_Bs)
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    ):
        return ops.stack_lora_weights(lora_As, lora_Bs)
    # The version counter follows in-place changes through the parameter; the storage, what
    # .to() / .half() put in its place (they keep the Parameter and its version).
    versions = tuple((t._version, t.data_ptr()) for t in tensors)
    kept = _stacks.setdefault(host, {})
    stack = kept.get(names)
    if (
        stack is None
        or stack.versions != versions
        or any(a is not b for a, b in zip(stack.tensors, tensors, strict=True))
    ):
        stack = kept[names] = _Stack(tensors, versions, *ops.stack_lora_weights(lora_As, lora_Bs))
    return stack.lora_A, stack.lora_B


def scalings_tensor(host, names, deltas, device) -> torch.Tensor:
    """[n] float32 on `device`: each delta's scaling (a constant of the op)."""
    values = [delta.scaling for delta in deltas]
    if torch.compiler.is_compiling():
        return torch.tensor(values, device=device)
    kept = _scalings_cache.setdefault(host, {})
    key = (names, device)
    cached = kept.get(key)
    if cached is None or cached[0] != values:
        cached = kept[key] = (values, torch.tensor(values, device=device))
    return cached[1]
