"""Adapter bottleneck, out = h + up(act(down(h))), for each provider.

Providers: the floor (the bytes an adapter cannot avoid moving: read h and write out once in
the forward, read grad_out and write grad_h once in the backward, timed as a copy each way),
fastdelta's `adapter_bottleneck` op with each backend forced, and the eager reference
(`fastdelta.ops.reference.adapter_bottleneck`, differentiated by autograd). PEFT has no
bottleneck adapter, so it is not a provider here. A sequential adapter with gelu_new, weights
normal(0, 0.01) as AdapterModel starts them.
"""

from __future__ import annotations

import torch

from benchmarks.cases import AdapterCase
from benchmarks.cases import adapter_cases as cases
from benchmarks.harness import FLOOR, Workload, case_info, fastdelta_providers, run_workload
from fastdelta import ops
from fastdelta.ops import reference

PROVIDERS = (FLOOR, *fastdelta_providers(), "reference")
ACTIVATION = "gelu_new"
__all__ = ["PROVIDERS", "bench_adapter_bottleneck", "build", "cases"]


class _CopyFloor(torch.autograd.Function):
    """h -> a copy of h, whose backward copies grad_out: one read and one write each way."""

    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out.clone()


def build(provider: str, case: AdapterCase, dtype: torch.dtype, device: torch.device) -> Workload:
    """The workload of `provider` on `case`."""
    torch.manual_seed(0)
    factory = {"device": device, "dtype": dtype}
    h = torch.randn(case.M, case.d, **factory, requires_grad=True)
    if provider == FLOOR:
        return Workload(lambda: _CopyFloor.apply(h), [h], [], "aten")
    down_weight = (torch.randn(case.m, case.d, **factory) * 0.01).requires_grad_()
    down_bias = torch.zeros(case.m, **factory, requires_grad=True)
    up_weight = (torch.randn(case.d, case.m, **factory) * 0.01).requires_grad_()
    up_bias = torch.zeros(case.d, **factory, requires_grad=True)
    parameters = [down_weight, down_bias, up_weight, up_bias]
    if provider == "reference":
        function, backend, forced = reference.adapter_bottleneck, "eager", None
    else:
        backend = provider.removeprefix("fastdelta-")
        function, forced = ops.adapter_bottleneck, backend

    def forward():
        return function(h, *parameters, 1.0, ACTIVATION)

    return Workload(forward, [h, *parameters], parameters, backend, forced)


def bench_adapter_bottleneck(benchmark, timing, case, provider, dtype, mode, device):
    workload = build(provider, case, dtype, device)
    info = case_info("adapter_bottleneck", provider, case, dtype, device)
    run_workload(benchmark, workload, mode, device, info, timing)
