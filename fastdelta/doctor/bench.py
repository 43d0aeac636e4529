"""The doctor's short benchmark: headline shapes against the floor, and PEFT.

The repository's benchmark suite (benchmarks/, `fastdelta bench`) is not part of an installed
package, so the doctor keeps this small timing loop here: a training step (forward, then the
gradients of the input and the trainable tensors) of each provider on one case, timed to its
end (synchronised), median of as many calls as fit in the case's share of the time budget.

Providers, as in the suite: the floor (LoRA: the frozen nn.Linear alone; adapter: a copy of
the input each way, the bytes an adapter cannot avoid moving), fastdelta on the backend it picks
by itself, and PEFT's LoRA on the same linear where PEFT is installed.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastdelta import ops

WARMUP_CALLS = 3
MIN_CALLS, MAX_CALLS = 5, 1000
FLOOR = "floor"


@dataclass(frozen=True)
class Case:
    """One headline shape: LoRA of rank `size` on a [features, features] linear, or an adapter of
    bottleneck `size` on `features`, at M rows."""

    op: str
    features: int
    size: int
    m: int

    @property
    def name(self) -> str:
        if self.op == "lora":
            return f"LoRA r={self.size} on {self.features}x{self.features} linear, M={self.m}"
        return f"adapter {self.size} on {self.features}, M={self.m}"


def cases(device: torch.device) -> list[Case]:
    """The headline shapes: a 7B model's projection (training-sized M and decoding's M=1) on a
    GPU; a quarter of the width on the CPU, where 4096 would take seconds a step."""
    features = 4096 if device.type == "cuda" else 1024
    rows = (4096, 1) if device.type == "cuda" else (256, 1)
    return [Case("lora", features, 16, m) for m in rows] + [
        Case("adapter", features, 24, m) for m in rows
    ]


def bench_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], None], device: torch.device, seconds: float) -> float:
    """Median milliseconds of `step` (synchronised), over the calls that fit in `seconds` after
    WARMUP_CALLS (the first compiles, autotunes and fills the allocator's caches)."""
    for _ in range(WARMUP_CALLS):
        step()
    synchronize(device)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < MIN_CALLS or (time.perf_counter() < end and len(times) < MAX_CALLS):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _training_step(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]):
    def step() -> None:
        output = forward()
        torch.autograd.grad(output, inputs, torch.ones_like(output))

    return step


class _CopyFloor(torch.autograd.Function):
    """h -> a copy of h, whose backward copies the gradient: one read and one write each way."""

    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def _steps(case: Case, dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    """provider -> its training step on `case`."""
    generator = torch.Generator(device=device).manual_seed(0)
    factory = {"device": device, "dtype": dtype}

    def random(*shape, scale=1.0):
        return torch.randn(shape, generator=generator, **factory) * scale

    x = random(case.m, case.features).requires_grad_()
    if case.op == "adapter":
        down, up = random(case.size, case.features, scale=0.01), random(case.features, case.size)
        parameters = [down, torch.zeros(case.size, **factory), up * 0.01]
        parameters.append(torch.zeros(case.features, **factory))
        parameters = [p.requires_grad_() for p in parameters]
        down_weight, down_bias, up_weight, up_bias = parameters
        return {
            FLOOR: _training_step(lambda: _CopyFloor.apply(x), [x]),
            "fastdelta": _training_step(
                lambda: ops.adapter_bottleneck(
                    x, down_weight, down_bias, up_weight, up_bias, 1.0, "gelu_new"
                ),
                [x, *parameters],
            ),
        }
    linear = nn.Linear(case.features, case.features, **factory).requires_grad_(False)
    lora_A = random(case.size, case.features, scale=case.features**-0.5).requires_grad_()
    lora_B = random(case.features, case.size, scale=case.size**-0.5).requires_grad_()
    scaling = 2.0

    def lora():
        return ops.lora_linear(x, linear.weight, linear.bias, lora_A, lora_B, scaling)

    steps = {
        FLOOR: _training_step(lambda: linear(x), [x]),
        "fastdelta": _training_step(lora, [x, lora_A, lora_B]),
    }
    if importlib.util.find_spec("peft") is not None:
        steps["peft"] = _peft_step(linear, lora_A, lora_B, x, scaling)
    return steps


def _peft_step(linear: nn.Linear, lora_A, lora_B, x, scaling: float) -> Callable[[], None]:
    import peft

    rank = lora_A.shape[0]
    config = peft.LoraConfig(target_modules=["0"], r=rank, lora_alpha=scaling * rank)
    model = peft.get_peft_model(nn.Sequential(linear), config, autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name:
                parameter.copy_(lora_A)
            elif "lora_B" in name:
                parameter.copy_(lora_B)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return _training_step(lambda: model(x), [x, *trainable])


def run(devices: list[torch.device], seconds: float, progress: Callable[[str], None]) -> list[dict]:
    """Time every provider on every case on each device, in about `seconds` in all."""
    plan = [(device, case) for device in devices for case in cases(device)]
    records = []
    for device, case in plan:
        dtype = bench_dtype(device)
        steps = _steps(case, dtype, device)
        share = seconds / (len(plan) * len(steps))
        timings = {}
        for provider, step in steps.items():
            progress(f"timing {provider} on {case.name} ({device}, {dtype})")
            timings[provider] = measure(step, device, share)
        for provider, milliseconds in timings.items():
            records.append(
                {
                    "device": str(device),
                    "case": case.name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "provider": provider,
                    "backend": ops.resolve_backend(device, dtype)
                    if provider == "fastdelta"
                    else None,
                    "step_ms": round(milliseconds, 4),
                    "vs_floor": round(milliseconds / timings[FLOOR], 3),
                }
            )
    return records
