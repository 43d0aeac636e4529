"""Mixed-batch LoRA: `adapters` LoRAs sharing one batch on one frozen base, for each provider.

The rows of x are dealt round-robin to the adapters (every adapter of rank r, alpha = 2r).
Providers: the floor (the frozen base linear alone on the whole batch), fastdelta's
`multi_lora_linear` with each backend forced (the adapters stacked as [n, r, K] and [n, N, r]
parameters), `sequential` (the adapters one after another: `fastdelta.ops.lora_linear` on each
adapter's rows with its own weights, the outputs put back in row order; the backend fastdelta
picks by itself) and `single_lora` (one LoRA on every row, the cost a mixed batch would have if
it were one adapter's). Layer-level providers, each row a sample of its own: `mixed-layer`
(an nn.Linear carrying one named LoraModel per adapter, called under `fastdelta.adapter_ids`
with each row's name: the context's entry is part of each call, as it is of each batch),
`layer-one-by-one` (that layer, `set_active(name)` and a call on the name's rows, name after
name) and `peft-adapter-names` (PEFT's LoRA layer with an adapter per name, called through its
PeftModel as `model(x, adapter_names=[...])`; PEFT refuses adapter_names in training, so it runs
inference only). Phases: train (forward and backward, the input and the LoRA weights requiring
grad) and inference (a forward under torch.no_grad()).
"""

from __future__ import annotations

from contextlib import nullcontext

import peft
import pytest
import torch
from torch import nn

import fastdelta
from benchmarks.cases import MultiLoraCase
from benchmarks.cases import multi_lora_cases as cases
from benchmarks.harness import (
    FLOOR,
    Workload,
    case_info,
    fastdelta_providers,
    forced_backend,
    run_workload,
    saved_tensor_bytes,
    time_call,
    timed_function,
)
from fastdelta import ops

LAYER = "mixed-layer"
ONE_BY_ONE = "layer-one-by-one"
PEFT = "peft-adapter-names"
PROVIDERS = (FLOOR, *fastdelta_providers(), "sequential", "single_lora", LAYER, ONE_BY_ONE, PEFT)
PHASES = ("train", "inference")
__all__ = ["PHASES", "PROVIDERS", "bench_multi_lora", "build", "cases"]


def case_tensors(case: MultiLoraCase, dtype: torch.dtype, device: torch.device):
    """(the frozen base linear, the stacks lora_A [n, r, K] and lora_B [n, N, r], the
    scalings, the adapter ids, x), the same for every provider (seed 0)."""
    torch.manual_seed(0)
    factory = {"device": device, "dtype": dtype}
    base = nn.Linear(case.K, case.N, **factory).requires_grad_(False)
    lora_A = torch.randn(case.adapters, case.r, case.K, **factory) / case.K**0.5
    lora_B = torch.randn(case.adapters, case.N, case.r, **factory) / case.r**0.5
    scalings = torch.full((case.adapters,), 2.0, device=device)
    adapter_ids = torch.arange(case.M, device=device) % case.adapters
    x = torch.randn(case.M, case.K, **factory)
    return base, lora_A, lora_B, scalings, adapter_ids, x


def build(
    provider: str, case: MultiLoraCase, dtype: torch.dtype, device: torch.device, training: bool
) -> Workload:
    """The workload of `provider` on `case`, training or inference."""
    base, lora_A, lora_B, scalings, adapter_ids, x = case_tensors(case, dtype, device)
    weight, bias = base.weight, base.bias
    dropout = case.dropout if training else 0.0
    x.requires_grad_(training)
    if provider == FLOOR:
        return _workload(lambda: base(x), [x], [weight, bias], "aten", None, training)
    if provider == "single_lora":
        A, B = (t[0].clone().requires_grad_(training) for t in (lora_A, lora_B))

        def forward():
            return ops.lora_linear(x, weight, bias, A, B, 2.0, dropout)

        return _workload(forward, [x, A, B], [weight, bias, A, B], "auto", None, training)
    if provider == "sequential":
        rows = [(adapter_ids == j).nonzero().squeeze(1) for j in range(case.adapters)]
        inverse = torch.argsort(torch.cat(rows))
        As = [lora_A[j].clone().requires_grad_(training) for j in range(case.adapters)]
        Bs = [lora_B[j].clone().requires_grad_(training) for j in range(case.adapters)]

        def forward():
            outputs = [
                ops.lora_linear(x[r], weight, bias, a, b, 2.0, dropout)
                for r, a, b in zip(rows, As, Bs, strict=True)
            ]
            return torch.cat(outputs).index_select(0, inverse)

        return _workload(forward, [x, *As, *Bs], [weight, bias, *As, *Bs], "auto", None, training)
    if provider in (LAYER, ONE_BY_ONE, PEFT):
        return _layer_workload(provider, case, base, lora_A, lora_B, x, training)
    backend = provider.removeprefix("fastdelta-")
    A, B = (t.requires_grad_(training) for t in (lora_A, lora_B))
    segments = ops.adapter_segments(adapter_ids, case.adapters)  # once per batch, not per layer

    def forward():
        return ops.multi_lora_linear(x, weight, bias, A, B, scalings, segments, dropout)

    return _workload(forward, [x, A, B], [weight, bias, A, B], backend, backend, training)


def _layer_workload(provider, case, base, lora_A, lora_B, x, training) -> Workload:
    """A layer-level provider's workload: `base` with the case's adapters as named deltas (or
    PEFT adapters), each row of x a sample of adapter row % n."""
    names = [f"adapter_{j}" for j in range(case.adapters)]
    labels = [names[row % case.adapters] for row in range(case.M)]
    model = nn.Sequential(base)
    if provider == PEFT:
        factors = []
        for j, name in enumerate(names):
            config = peft.LoraConfig(target_modules=["0"], r=case.r, lora_alpha=2 * case.r)
            if j == 0:
                model = peft.get_peft_model(model, config, name, autocast_adapter_dtype=False)
            else:
                model.add_adapter(name, config)
            layer = model.base_model.model[0]
            factors += [layer.lora_A[name].weight, layer.lora_B[name].weight]
        model.eval()

        def forward():
            return model(x, adapter_names=labels)

        backend = "peft"
    else:
        for name in names:
            fastdelta.LoraModel(
                model, modified_modules=["0"], lora_r=case.r, lora_alpha=2 * case.r,
                lora_dropout=case.dropout, name=name,
            )  # fmt: skip
        host = model[0]
        deltas = [delta for key, delta in host.named_children() if key.startswith("lora")]
        factors = [factor for delta in deltas for factor in (delta.lora_A, delta.lora_B)]
        model.train(training)
        if provider == LAYER:

            def forward():
                with fastdelta.adapter_ids(model, labels):
                    return model(x)

        else:
            rows = [
                torch.arange(j, case.M, case.adapters, device=x.device) for j in range(len(names))
            ]
            inverse = torch.argsort(torch.cat(rows))

            def forward():
                outputs = []
                for name, selected in zip(names, rows, strict=True):
                    fastdelta.set_active(model, name)
                    outputs.append(model(x[selected]))
                return torch.cat(outputs).index_select(0, inverse)

        backend = "auto"
    with torch.no_grad():
        for j in range(case.adapters):
            factors[2 * j].copy_(lora_A[j])
            factors[2 * j + 1].copy_(lora_B[j])
    for factor in factors:
        factor.requires_grad_(training)
    return _workload(
        forward, [x, *factors], [base.weight, base.bias, *factors], backend, None, training
    )


def _workload(forward, inputs, parameters, backend, fastdelta_backend, training) -> Workload:
    """A Workload; for inference its forward runs under torch.no_grad()."""
    if not training:
        plain = forward

        def forward():
            with torch.no_grad():
                return plain()

    return Workload(forward, inputs, parameters, backend, fastdelta_backend)


@pytest.mark.parametrize("phase", PHASES)
def bench_multi_lora(benchmark, timing, case, provider, dtype, phase, device):
    training = phase == "train"
    if provider == PEFT and training:
        pytest.skip("PEFT refuses adapter_names in training mode: it runs inference only")
    workload = build(provider, case, dtype, device, training)
    info = case_info("multi_lora_linear", provider, case, dtype, device)
    if training:  # forward and backward, with the memory figures
        run_workload(benchmark, workload, "full", device, info, timing)
        return
    benchmark.group = f"{info['op']} {info['case_id']} {info['dtype']} inference"
    benchmark.extra_info.update(info, mode="inference", backend=workload.backend)
    forcing = workload.fastdelta_backend
    with forced_backend(forcing) if forcing else nullcontext():
        # Bytes saved for backward by one forward: none under no_grad, measured all the same.
        saved = saved_tensor_bytes(workload.forward, workload.parameters)
    benchmark.extra_info.update(saved_bytes=saved)
    with forced_backend(forcing) if forcing else nullcontext():
        time_call(benchmark, timed_function(workload, "forward", device), timing)
