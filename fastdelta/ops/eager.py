"""When the fused ops skip their custom op's dispatch, and how they still show in a profile.

`torch.library` custom ops are what torch.compile, FakeTensor and tensor subclasses need, but
in eager mode their dispatch costs tens of microseconds a call (measured on the CPU: a LoRA
linear's forward and backward on a [4, 64] input took 290 us through the op against 105 us
eager), which decode-sized inputs and small models feel. So in eager mode on plain tensors
the ops run the same backend functions through a plain autograd.Function instead; one
implementation per backend either way, so the two paths compute the same thing. The cpp
backend goes one step further: its eager path is one C++ op whose autograd node is C++ too
(see `fastdelta.ops.cpp_backend.lora_linear`).
"""

from __future__ import annotations

import contextlib

import torch

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_path(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on `tensors` may bypass its custom op: not while torch.compile (or
    export) traces, and only for plain tensors (not FakeTensor, DTensor or other subclasses,
    which need the op's fake kernel or its dispatch)."""
    if torch.compiler.is_compiling():
        return False
    return all(tensor is None or type(tensor) in _PLAIN_TYPES for tensor in tensors)


def profiled(name: str) -> contextlib.AbstractContextManager:
    """A profiler range called `name` (the op's name) while torch.profiler records, else
    nothing, so the eager path still shows as fastdelta::... in a trace."""
    if torch.autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(name)
    return contextlib.nullcontext()
