"""Delta models under torch.distributed: DistributedDataParallel and FSDP2 (`fully_shard`).

Two processes on the CPU talk through gloo (CI has no GPU); the `gpu` tests repeat the DDP run
with NCCL where there are two GPUs. Each process trains the same tiny BERT classifier on its own
batches. With DDP the delta gradients must be the mean of the per-process gradients, identical
on both ranks, and the replicas must stay equal; frozen backbone parameters get no gradient and
need no `find_unused_parameters`. With FSDP2 the run must match one process training on both
ranks' batches, and `save_finetuned` must write the gathered deltas.
"""

from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import tiny_inputs, tiny_model
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from fastdelta import AutoDeltaModel

WORLD_SIZE, STEPS = 2, 3
DELTA_TYPES = ("lora", "adapter", "parallel_adapter", "bitfit")
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")


def delta_model_of(delta_type: str):
    """(model, delta model) of a tiny BERT classifier, the same in every process."""
    model = tiny_model("bert", "classification", **NO_DROPOUT)
    torch.manual_seed(0)
    delta_model = AutoDeltaModel.from_config({"delta_type": delta_type}, model)
    delta_model.freeze_module()
    return model, delta_model


def batch(rank: int, step: int, device: str) -> dict:
    """The batch of process `rank` at `step`: different in each process."""
    inputs = tiny_inputs("bert", "classification", batch=3, seed=100 * step + rank)
    inputs["labels"] = inputs["input_ids"][:, 0] % 2
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def gradients(model) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in model.named_parameters()
    }


def ddp_run(rank: int, delta_type: str, device: str) -> dict:
    """One DDP backward and STEPS optimizer steps; what the test checks, on the CPU."""
    model, _ = delta_model_of(delta_type)
    model.to(device)
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model, device_ids=[rank] if device != "cpu" else None)
    ddp(**batch(rank, 0, device)).loss.backward()
    synced = gradients(model)
    # The same gradient computed in one process: the mean over both processes' batches.
    losses = [reference(**batch(other, 0, device)).loss for other in range(WORLD_SIZE)]
    (sum(losses) / WORLD_SIZE).backward()
    expected = gradients(reference)

    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    optimizer.step()
    optimizer.zero_grad()
    for step in range(1, STEPS):
        ddp(**batch(rank, step, device)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {
        "synced": {k: None if v is None else v.cpu() for k, v in synced.items()},
        "expected": {k: None if v is None else v.cpu() for k, v in expected.items()},
        "final": {name: tensor.cpu().clone() for name, tensor in trainable(model).items()},
    }


def fsdp_run(rank: int, checkpoint_dir: str) -> dict:
    """STEPS steps of LoRA under FSDP2, each layer and the root sharded, then a saved
    checkpoint; the final trainable tensors, gathered."""
    model, delta_model = delta_model_of("lora")
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    for step in range(STEPS):
        model(**batch(rank, step, "cpu")).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    sharded = [name for name, p in model.named_parameters() if type(p).__name__ == "DTensor"]
    delta_model.save_finetuned(checkpoint_dir)
    final = {name: tensor.full_tensor() for name, tensor in trainable(model).items()}
    return {"sharded": sharded, "final": final}


def worker(rank: int, store: str, results: str, device: str, backend: str, run: str) -> None:
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(
        backend,
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        if run == "fsdp":
            outcome = fsdp_run(rank, f"{results}/fsdp-checkpoint")
        else:
            outcome = {delta_type: ddp_run(rank, delta_type, device) for delta_type in DELTA_TYPES}
        torch.save(outcome, f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(tmp_path, device: str, backend: str, run: str = "ddp") -> list[dict]:
    """Run `worker` in WORLD_SIZE processes ("ddp" or "fsdp"); their outcomes by rank."""
    # fork starts in a fraction of spawn's time (no re-import); CUDA needs spawn.
    start_method = "spawn" if device == "cuda" else "fork"
    mp.start_processes(
        worker,
        args=(str(tmp_path / "store"), str(tmp_path), device, backend, run),
        nprocs=WORLD_SIZE,
        start_method=start_method,
    )
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def ddp_outcomes(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp"), "cpu", "gloo")


@pytest.fixture(scope="module")
def fsdp_outcomes(tmp_path_factory):
    """(the directory of the run's checkpoint, the outcomes by rank)."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    return tmp_path / "fsdp-checkpoint", launch(tmp_path, "cpu", "gloo", "fsdp")


def check_ddp(outcomes: list[dict], delta_type: str) -> None:
    first, second = (outcome[delta_type] for outcome in outcomes)
    trainable_names = set(first["final"])
    for name, gradient in first["synced"].items():
        if name not in trainable_names:
            assert gradient is None, f"frozen {name} got a gradient"
            continue
        # All-reduced: the same bits on both ranks, the mean of the two batches' gradients.
        assert torch.equal(gradient, second["synced"][name]), name
        torch.testing.assert_close(gradient, first["expected"][name], rtol=1e-5, atol=1e-7)
    for name, tensor in first["final"].items():
        assert torch.equal(tensor, second["final"][name]), f"replicas differ in {name}"


@pytest.mark.parametrize("delta_type", DELTA_TYPES)
def test_ddp_averages_delta_gradients_and_keeps_replicas_equal(ddp_outcomes, delta_type):
    check_ddp(ddp_outcomes, delta_type)


def test_fsdp2_matches_one_process_on_both_batches(fsdp_outcomes):
    _, outcomes = fsdp_outcomes
    model, _ = delta_model_of("lora")
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    for step in range(STEPS):
        losses = [model(**batch(rank, step, "cpu")).loss for rank in range(WORLD_SIZE)]
        (sum(losses) / WORLD_SIZE).backward()
        optimizer.step()
        optimizer.zero_grad()

    first, second = outcomes
    assert any(".lora.lora_A" in name for name in first["sharded"])
    assert first["final"].keys() == trainable(model).keys()
    for name, tensor in trainable(model).items():
        assert torch.equal(first["final"][name], second["final"][name]), name
        torch.testing.assert_close(first["final"][name], tensor, rtol=1e-5, atol=1e-6)


def test_fsdp2_checkpoint_holds_the_gathered_deltas(fsdp_outcomes):
    checkpoint, outcomes = fsdp_outcomes
    fresh = tiny_model("bert", "classification")
    AutoDeltaModel.from_finetuned(checkpoint, backbone_model=fresh)
    for name, tensor in outcomes[0]["final"].items():
        assert torch.equal(fresh.get_parameter(name), tensor), name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs for NCCL")
def test_ddp_over_nccl_averages_delta_gradients(tmp_path):
    outcomes = launch(tmp_path, "cuda", "nccl")
    for delta_type in DELTA_TYPES:
        check_ddp(outcomes, delta_type)
