"""One training step of a Llama-style decoder, built from a LlamaConfig (no weights needed).

Providers: fastdelta's LoraModel on every linear layer of the decoder layers (q, k, v, o, gate,
up, down; not lm_head, as PEFT's "all-linear" leaves it out) with freeze_module(); the same
model under torch.compile ("compiled": inductor, compiled by the step before timing); PEFT's
get_peft_model on the same modules; full fine-tuning of the whole model. Same base weights
(seed 0), same LoRA settings (r=16, alpha=32, dropout=0.1, adapter weights in the model's
dtype), same tokens, AdamW. A step is forward, backward, optimizer step and zero_grad.

Timing: on the CPU the providers are timed in sweeps (`sweeps`), each sweep building and timing
every provider in turn, and the report takes each provider's figure over the rounds of all its
sweeps. A shared machine's speed drifts over seconds: timed one after the other, a provider
whose few seconds of rounds fell in a slow stretch lost to one that ran in a fast stretch. The
quick grid's runs of one session, before sweeps, read fastdelta / PEFT at 1.12, 1.27, 1.33 and
1.17x, with fastdelta's step between 310 and 362 ms. A GPU run keeps one sweep: its full-size
models take long to build and compile three times over.

Memory: on CUDA the peak allocated during a step (`torch.cuda.max_memory_allocated`); on the
CPU, which has no such counter, what is resident when backward starts: parameters, optimizer
state and the tensors saved for backward.
"""

from __future__ import annotations

import peft
import torch
import transformers

import fastdelta
from benchmarks.cases import DecoderCase
from benchmarks.cases import decoder_cases as cases
from benchmarks.harness import (
    case_info,
    cuda_peak_bytes,
    saved_tensor_bytes,
    synchronize,
    time_call,
)

PROVIDERS = ("fastdelta", "compiled", "peft", "full-finetune")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.1
CPU_SWEEPS = 3
__all__ = ["PROVIDERS", "bench_training_step", "build_model", "cases", "sweeps"]


def sweeps(grid: str, device_type: str) -> int:
    """How many sweeps time the providers (see the module docstring)."""
    return CPU_SWEEPS if device_type == "cpu" and grid != "smoke" else 1


def step_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU; float32 on the CPU, whose bfloat16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(provider: str, case: DecoderCase, dtype: torch.dtype, device: torch.device):
    """The decoder as `provider` trains it, and the backend its deltas run on."""
    config = transformers.LlamaConfig(
        vocab_size=case.vocab,
        hidden_size=case.hidden,
        intermediate_size=case.intermediate,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        num_key_value_heads=case.heads,
        max_position_embeddings=case.seq,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    torch.manual_seed(1)
    if provider == "full-finetune":
        return model, "aten"
    if provider == "compiled":
        model, backend = build_model("fastdelta", case, dtype, device)
        return torch.compile(model), f"{backend} (torch.compile)"
    if provider == "peft":
        lora = peft.LoraConfig(
            target_modules=LORA_TARGETS, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT
        )
        return peft.get_peft_model(model, lora, autocast_adapter_dtype=False), "peft"
    delta_model = fastdelta.LoraModel(
        backbone_model=model,
        modified_modules=LORA_TARGETS,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
    )
    delta_model.freeze_module()
    return model, ",".join(sorted(delta_model.backends()))


def memory_info(step, model, optimizer, device: torch.device) -> dict:
    """The step's memory figure (see the module docstring), and its parts on the CPU."""
    if device.type == "cuda":
        peak, _ = cuda_peak_bytes(step, device)
        return {"memory_bytes": peak, "memory_kind": "peak allocated"}
    parameters = list(model.parameters())
    saved = saved_tensor_bytes(step, parameters)
    parameter_bytes = sum(p.numel() * p.element_size() for p in parameters)
    state_bytes = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    return {
        "memory_bytes": parameter_bytes + state_bytes + saved,
        "memory_kind": "resident at backward start",
        "saved_bytes": saved,
        "parameter_bytes": parameter_bytes,
        "optimizer_state_bytes": state_bytes,
    }


def bench_training_step(benchmark, timing, case, sweep, provider, device):
    dtype = step_dtype(device)
    model, backend = build_model(provider, case, dtype, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(case.vocab, (case.batch, case.seq), generator=generator).to(device)

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    step()  # creates the optimizer state, which the memory figure counts
    info = case_info("training_step", provider, case, dtype, device)
    benchmark.group = f"training_step {case.id} {info['dtype']}"
    benchmark.extra_info.update(
        info,
        sweep=sweep.index,
        mode="step",
        backend=backend,
        tokens=case.tokens,
        trainable_parameters=sum(p.numel() for p in trainable),
    )
    benchmark.extra_info.update(memory_info(step, model, optimizer, device))
    time_call(benchmark, step, timing.share(sweep.count), warmup_calls=1)  # after two steps
