"""DoRA linear: a LoRA linear whose output rows a trained magnitude scales (LoraModel's
use_dora), for each provider.

Providers: the floor (the frozen base `nn.Linear` alone), fastdelta's DoRA on the backend it
picks by itself (`fastdelta`: the fused `fastdelta::dora_linear` without dropout; with dropout
the default dora_dropout="peft", PEFT's eager form with its second base GEMM), fastdelta's DoRA
with dora_dropout="low_rank" (`low_rank`: the fused op with dropout on the low-rank path; run
only where there is dropout, elsewhere it is `fastdelta`), fastdelta's LoRA on the same layer
(`lora`: what DoRA costs on top of it) and PEFT's DoRA. All share the case's base and LoRA
weights (alpha = 2r) and start the magnitude at the base weight's row norms.
"""

from __future__ import annotations

import peft
import pytest
import torch

import fastdelta
from benchmarks.bench_lora_linear import _copy_lora_weights, case_tensors
from benchmarks.cases import LoraCase
from benchmarks.cases import dora_cases as cases
from benchmarks.harness import FLOOR, Workload, case_info, run_workload

PROVIDERS = (FLOOR, "fastdelta", "low_rank", "lora", "peft")
__all__ = ["PROVIDERS", "bench_dora", "build", "cases"]


def build(provider: str, case: LoraCase, dtype: torch.dtype, device: torch.device) -> Workload:
    """The workload of `provider` on `case`."""
    base, lora_A, lora_B, x = case_tensors(case, dtype, device)
    alpha = 2 * case.r
    if provider == "low_rank" and not case.dropout:
        pytest.skip("without dropout both dropout forms are the same fused op (`fastdelta`)")
    if provider == FLOOR:
        return Workload(lambda: base(x), [x], list(base.parameters()), "aten")
    if provider == "peft":
        config = peft.LoraConfig(
            target_modules=["0"], r=case.r, lora_alpha=alpha, lora_dropout=case.dropout,
            use_dora=True,
        )  # fmt: skip
        model = peft.get_peft_model(base, config, autocast_adapter_dtype=False)
        backend = "peft"
    else:
        model = base
        delta_model = fastdelta.LoraModel(
            backbone_model=model,
            modified_modules=["0"],
            lora_r=case.r,
            lora_alpha=alpha,
            lora_dropout=case.dropout,
            use_dora=provider in ("fastdelta", "low_rank"),
            dora_dropout="low_rank" if provider == "low_rank" else "peft",
        )
        delta_model.freeze_module()
        backend = ",".join(sorted(delta_model.backends()))
    _copy_lora_weights(model, lora_A, lora_B)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Workload(lambda: model(x), [x, *trainable], list(model.parameters()), backend)


def bench_dora(benchmark, timing, case, provider, dtype, mode, device):
    workload = build(provider, case, dtype, device)
    info = case_info("dora_linear", provider, case, dtype, device)
    run_workload(benchmark, workload, mode, device, info, timing)
