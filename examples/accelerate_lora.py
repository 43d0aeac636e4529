"""The main job (finetune.py) as data-parallel training with HuggingFace accelerate.

Each process trains its own shard of every batch; accelerate wraps the backbone in
DistributedDataParallel, which all-reduces the gradients of the deltas and the head. Frozen
parameters take no part in that, so no `find_unused_parameters` is needed. The delta model is
built before `accelerator.prepare` and saved from the main process: it holds the backbone
that the DDP wrapper runs.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_lora.py  # two GPUs
    torchrun --nproc_per_node 2 examples/accelerate_lora.py --cpu  # two CPU processes (gloo)
    python examples/accelerate_lora.py  # one process
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import finetune as job
import torch
import transformers
from accelerate import Accelerator
from transformers import AutoTokenizer

from fastdelta import AutoDeltaModel
from fastdelta.visualization import output_console


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delta", default="lora", choices=sorted(job.DELTAS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=32, help="over all processes")
    parser.add_argument("--lr", type=float, help="learning rate (default: per delta type)")
    parser.add_argument("--output-dir", type=Path, default=Path("delta_checkpoints/accelerate"))
    parser.add_argument("--backbone", help="a local model directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    args = parser.parse_args()
    args.lr = args.lr or job.DELTAS[args.delta][1]
    return args


def main() -> None:
    args = parse_arguments()
    accelerator = Accelerator(cpu=args.cpu)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    path = job.backbone_path(args.backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = job.load_backbone(path, torch.device("cpu"))
    arguments, _ = job.DELTAS[args.delta]
    delta_model = AutoDeltaModel.from_config({"delta_type": args.delta, **arguments}, model)
    delta_model.freeze_module(exclude=["deltas", *job.HEAD])

    def collate(examples):
        inputs = tokenizer([text for text, _ in examples], padding=True, return_tensors="pt")
        return {**inputs, "labels": torch.tensor([label for _, label in examples])}

    def loader(split: str, shuffle: bool, batch_size: int):
        texts, labels = job.load_reviews(split)
        examples = list(zip(texts, labels.tolist(), strict=True))
        return torch.utils.data.DataLoader(
            examples, batch_size=batch_size, shuffle=shuffle, collate_fn=collate
        )

    per_process = max(1, args.batch_size // accelerator.num_processes)
    train_loader, test_loader = loader("train", True, per_process), loader("test", False, 128)
    optimizer = torch.optim.AdamW(delta_model.trainable_parameters(), lr=args.lr)
    model, optimizer, train_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, test_loader
    )

    steps, start = 0, time.perf_counter()
    model.train()
    every_batch = (batch for _ in range(args.epochs) for batch in train_loader)
    for batch in itertools.islice(every_batch, args.max_steps):
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    seconds = time.perf_counter() - start

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in test_loader:
            predictions = model(**batch).logits.argmax(-1)
            predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
            correct += (predictions == labels).sum().item()
            total += len(labels)
    if accelerator.is_main_process:
        delta_model.save_finetuned(args.output_dir)
        output_console().print(
            f"{accelerator.num_processes} process(es) on {accelerator.device.type} with "
            f"{torch.get_num_threads()} torch threads each: {steps} steps in {seconds:.1f} s, "
            f"test accuracy {correct / total:.3f}; deltas saved to {args.output_dir}"
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
