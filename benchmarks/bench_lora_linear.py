"""LoRA linear, y = x W^T + b + scaling * (dropout(x) A^T) B^T, for each provider.

Providers: the floor (the frozen base `nn.Linear` alone, its input requiring grad), fastdelta's
`LoraModel` on that linear with each backend forced, PEFT's LoRA on the same linear (adapter
weights kept in the model's dtype, as fastdelta's are), and the eager reference
(`fastdelta.ops.reference.lora_linear`, differentiated by autograd). All share the case's base
and LoRA weights (alpha = 2r).
"""

from __future__ import annotations

import peft
import torch
from torch import nn

import fastdelta
from benchmarks.cases import LoraCase
from benchmarks.cases import lora_linear_cases as cases
from benchmarks.harness import FLOOR, Workload, case_info, fastdelta_providers, run_workload
from fastdelta.ops import reference

PROVIDERS = (FLOOR, *fastdelta_providers(), "peft", "reference")
__all__ = ["PROVIDERS", "bench_lora_linear", "build", "cases"]


def _copy_lora_weights(module: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Give the LoRA parameters of `module` (fastdelta's or PEFT's names) the case's values."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_A" in name:
                parameter.copy_(lora_A)
            elif "lora_B" in name:
                parameter.copy_(lora_B)


def case_tensors(case: LoraCase, dtype: torch.dtype, device: torch.device):
    """(the frozen base linear in an nn.Sequential, lora_A, lora_B, x requiring grad) of
    `case`, the same for every provider (seed 0)."""
    torch.manual_seed(0)
    factory = {"device": device, "dtype": dtype}
    base = nn.Sequential(nn.Linear(case.K, case.N, **factory)).requires_grad_(False)
    lora_A = torch.randn(case.r, case.K, **factory) / case.K**0.5
    lora_B = torch.randn(case.N, case.r, **factory) / case.r**0.5
    x = torch.randn(case.M, case.K, **factory, requires_grad=True)
    return base, lora_A, lora_B, x


def build(provider: str, case: LoraCase, dtype: torch.dtype, device: torch.device) -> Workload:
    """The workload of `provider` on `case`."""
    base, lora_A, lora_B, x = case_tensors(case, dtype, device)
    alpha = 2 * case.r
    if provider == FLOOR:
        return Workload(lambda: base(x), [x], list(base.parameters()), "aten")
    if provider == "reference":
        A, B = (t.clone().requires_grad_() for t in (lora_A, lora_B))
        weight, bias = base[0].weight, base[0].bias
        scaling = alpha / case.r

        def forward():
            return reference.lora_linear(x, weight, bias, A, B, scaling, case.dropout)

        return Workload(forward, [x, A, B], [weight, bias, A, B], "eager")
    if provider == "peft":
        config = peft.LoraConfig(
            target_modules=["0"], r=case.r, lora_alpha=alpha, lora_dropout=case.dropout
        )
        model = peft.get_peft_model(base, config, autocast_adapter_dtype=False)
        backend = "peft"
    else:
        backend = provider.removeprefix("fastdelta-")
        model = base
        delta_model = fastdelta.LoraModel(
            backbone_model=model,
            modified_modules=["0"],
            lora_r=case.r,
            lora_alpha=alpha,
            lora_dropout=case.dropout,
        )
        delta_model.freeze_module()
    _copy_lora_weights(model, lora_A, lora_B)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fastdelta_backend = None if provider == "peft" else backend
    return Workload(
        lambda: model(x), [x, *trainable], list(model.parameters()), backend, fastdelta_backend
    )


def bench_lora_linear(benchmark, timing, case, provider, dtype, mode, device):
    workload = build(provider, case, dtype, device)
    info = case_info("lora_linear", provider, case, dtype, device)
    run_workload(benchmark, workload, mode, device, info, timing)
