"""Host overhead: the per-call CPU time of the delta ops and layers on tiny tensors, where the
Python and dispatch work of a call, not its arithmetic, is what is timed.

Cases (`benchmarks.cases.host_overhead_cases`): LoRA and the adapter, as the functional op
(`ops.lora_linear`, `ops.adapter_bottleneck`) and as a whole layer (an `nn.Linear` with the
delta injected), forward and forward+backward, dropout on and off (LoRA), in training and in
evaluation (`eval()` under `torch.no_grad()`, forward only), on a [4, 64] input.

Providers: the floor (the plain `nn.Linear`, trainable, as it would train without a delta),
fastdelta on the backend it picks by itself, PEFT's LoRA layer (LoRA only; PEFT has no
functional op, so its layer stands in for the op too) and the eager reference
(`fastdelta.ops.reference`, differentiated by autograd; as a layer, the linear followed by it).
Each layer is called itself, as the model around it calls it: the injected `nn.Linear` for
fastdelta, PEFT's `lora.Linear`, not the wrappers that build them (an `nn.Sequential`, a
`PeftModel`).
Every case is timed on one CPU thread (torch.set_num_threads(1)), a call per round, the fastest
round reported, so the figures are host time, not thread-pool scheduling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import peft
import pytest
import torch
from torch import nn

import fastdelta
from benchmarks.cases import HostCase
from benchmarks.cases import host_overhead_cases as cases
from benchmarks.harness import FLOOR, Workload, case_info, saved_tensor_bytes, time_call
from fastdelta import ops
from fastdelta.ops import reference

PROVIDERS = (FLOOR, "fastdelta", "peft", "reference")
ALPHA = 16
ACTIVATION = "gelu_new"
AUTO = "auto"  # fastdelta on the backend it picks by itself
__all__ = ["PROVIDERS", "bench_host_overhead", "build", "cases"]


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread inside the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _no_grad(forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`forward` run under torch.no_grad(), as inference runs it."""

    def run() -> torch.Tensor:
        with torch.no_grad():
            return forward()

    return run


def _layer(module: nn.Module, x: torch.Tensor, case: HostCase, backend: str):
    """(forward, trainable tensors, backend) of a layer: `module` in the case's mode on x."""
    module.train(case.training)
    return (lambda: module(x)), [p for p in module.parameters() if p.requires_grad], backend


class _ReferenceLoraLayer(nn.Module):
    """A linear layer with the eager reference LoRA (dropout only while training)."""

    def __init__(self, base: nn.Linear, r: int, dropout: float):
        super().__init__()
        self.base = base
        self.dropout = dropout
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) / r**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        weights = (self.base.weight, self.base.bias, self.lora_A, self.lora_B)
        return reference.lora_linear(x, *weights, ALPHA / self.lora_A.shape[0], dropout)


def _lora_workload(provider: str, case: HostCase, base: nn.Linear, x: torch.Tensor):
    """(forward, trainable tensors, backend) of a non-floor provider's LoRA op or layer."""
    dropout = case.dropout if case.training else 0.0
    if provider == "peft":
        config = peft.LoraConfig(
            target_modules=["0"], r=case.r, lora_alpha=ALPHA, lora_dropout=case.dropout
        )
        model = peft.get_peft_model(nn.Sequential(base), config, autocast_adapter_dtype=False)
        return _layer(model.base_model.model[0], x, case, "peft")
    if case.subject == "layer" and provider == "fastdelta":
        host = nn.Sequential(base)
        fastdelta.LoraModel(
            host, modified_modules=["0"], lora_r=case.r, lora_alpha=ALPHA, lora_dropout=dropout
        ).freeze_module()
        return _layer(host[0], x, case, AUTO)
    if case.subject == "layer":
        return _layer(_ReferenceLoraLayer(base, case.r, case.dropout), x, case, "eager")
    lora_A = torch.randn(case.r, case.d).div_(case.d**0.5).requires_grad_()
    lora_B = torch.randn(case.d, case.r).div_(case.r**0.5).requires_grad_()
    function = ops.lora_linear if provider == "fastdelta" else reference.lora_linear
    scaling = ALPHA / case.r

    def forward() -> torch.Tensor:
        return function(x, base.weight, base.bias, lora_A, lora_B, scaling, dropout)

    return forward, [lora_A, lora_B], AUTO if provider == "fastdelta" else "eager"


class _ReferenceAdapterLayer(nn.Module):
    """A linear layer followed by the eager reference adapter, as AdapterModel injects one."""

    def __init__(self, base: nn.Linear, bottleneck: int):
        super().__init__()
        self.base = base
        self.down_weight = nn.Parameter(torch.randn(bottleneck, base.out_features) * 0.01)
        self.down_bias = nn.Parameter(torch.zeros(bottleneck))
        self.up_weight = nn.Parameter(torch.randn(base.out_features, bottleneck) * 0.01)
        self.up_bias = nn.Parameter(torch.zeros(base.out_features))

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.down_weight, self.down_bias, self.up_weight, self.up_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return reference.adapter_bottleneck(h, *self.adapter_parameters(), 1.0, ACTIVATION)


def _adapter_workload(provider: str, case: HostCase, base: nn.Linear, x: torch.Tensor):
    """(forward, trainable tensors, backend) of a non-floor provider's adapter op or layer."""
    if case.subject == "layer" and provider == "fastdelta":
        host = nn.Sequential(base)
        fastdelta.AdapterModel(
            host, bottleneck_dim=case.r, non_linearity=ACTIVATION, modified_modules=["0"]
        ).freeze_module()
        return _layer(host[0], x, case, AUTO)
    layer = _ReferenceAdapterLayer(base, case.r)
    if case.subject == "layer":
        return _layer(layer, x, case, "eager")
    parameters = layer.adapter_parameters()
    function = ops.adapter_bottleneck if provider == "fastdelta" else reference.adapter_bottleneck

    def forward() -> torch.Tensor:
        return function(x, *parameters, 1.0, ACTIVATION)

    return forward, list(parameters), AUTO if provider == "fastdelta" else "eager"


def build(provider: str, case: HostCase, dtype: torch.dtype, device: torch.device) -> Workload:
    """The workload of `provider` on `case`; pytest.skip for a provider the case has not."""
    if provider == "peft" and case.op != "lora":
        pytest.skip("PEFT has no adapter bottleneck")
    torch.manual_seed(0)
    base = nn.Linear(case.d, case.d, device=device, dtype=dtype)
    x = torch.randn(case.M, case.d, device=device, dtype=dtype, requires_grad=case.training)
    if provider == FLOOR:
        forward, trainable, backend = _layer(base, x, case, "aten")
    else:
        base.requires_grad_(False)
        make = _lora_workload if case.op == "lora" else _adapter_workload
        forward, trainable, backend = make(provider, case, base, x)
    if backend == AUTO:
        backend = ops.resolve_backend(device, dtype)
    if not case.training:
        forward = _no_grad(forward)
    inputs = [x, *trainable] if case.training else []
    return Workload(forward, inputs, trainable, backend)


def _timed_call(workload: Workload, mode: str) -> Callable[[], None]:
    """The call one round times: the forward, or the forward and the gradients of its inputs."""
    if mode == "forward":
        return workload.forward
    output = workload.forward()
    grad_output = torch.randn_like(output)

    def full() -> None:
        torch.autograd.grad(workload.forward(), list(workload.inputs), grad_output)

    return full


def bench_host_overhead(benchmark, timing, case, provider, dtype, device):
    if device.type != "cpu":
        pytest.skip("host overhead is timed on the CPU, where nothing else hides it")
    workload = build(provider, case, dtype, device)
    info = case_info("host_overhead", provider, case, dtype, device)
    benchmark.group = f"host_overhead {case.id} {info['dtype']}"
    benchmark.extra_info.update(info, mode=case.mode, backend=workload.backend)
    # Bytes saved for backward by one forward (none in evaluation), parameters left out.
    saved = saved_tensor_bytes(workload.forward, workload.parameters)
    benchmark.extra_info.update(saved_bytes=saved)
    with one_thread():
        time_call(benchmark, _timed_call(workload, case.mode), timing, warmup_calls=20)
