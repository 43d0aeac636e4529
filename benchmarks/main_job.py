"""The main job against the same job written with PEFT, in one process.

    python -m benchmarks.main_job [--steps 90] [--chunk 10] [--backbone DIR] [--threads N]

Both train what `examples/finetune.py` trains by default: LoRA (r = 8, alpha 16, no dropout) on
the query, value and intermediate projections of all-MiniLM-L6-v2, with the pooler and the new
classifier, on the same shuffled batches of the review data, with the job's optimizer step
(AdamW, gradient clipping at 1.0, zeroed gradients). fastdelta's side is the job's own code
(`AutoDeltaModel.from_config`, `freeze_module(exclude=["deltas", "classifier", "pooler"])`);
PEFT's is what a PEFT user writes for it (`LoraConfig(task_type="SEQ_CLS", ...,
modules_to_save=["classifier", "pooler"])`, `get_peft_model`). The two alternate every `chunk`
steps, each on its own copy of the backbone, so a change in the machine's load falls on both;
the first chunk of each is a warm-up and is not timed. It prints the steps/s of each, their
ratio and the last training loss of each (LoRA's A starts random, drawn differently by each
library, so the losses are close, not equal).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import time
from pathlib import Path

import torch

FINETUNE = Path(__file__).parent.parent / "examples" / "finetune.py"
PEFT_TARGETS = ["query", "value", "intermediate.dense"]


def _finetune_module():
    """examples/finetune.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("finetune", FINETUNE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Run:
    """One side of the comparison: a model, its trainable parameters and optimizer, and the
    time its timed steps took."""

    def __init__(self, name: str, model: torch.nn.Module, parameters: list, lr: float):
        self.name = name
        self.model = model.train()
        self.parameters = parameters
        self.optimizer = torch.optim.AdamW(parameters, lr=lr)
        self.seconds = 0.0
        self.timed_steps = 0
        self.loss = float("nan")

    def steps(self, batches, timed: bool) -> None:
        """Train on each (inputs, labels) of `batches`; time them when `timed`."""
        start = time.perf_counter()
        count = 0
        for inputs, labels in batches:
            loss = self.model(**inputs, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.loss = loss.item()
            count += 1
        if timed:
            self.seconds += time.perf_counter() - start
            self.timed_steps += count

    @property
    def steps_per_second(self) -> float:
        return self.timed_steps / self.seconds


def build_runs(finetune, path: Path, device: torch.device) -> tuple[Run, Run]:
    """(fastdelta's run, PEFT's run) of the job's LoRA, each on a freshly loaded backbone."""
    import peft

    from fastdelta import AutoDeltaModel

    arguments, lr = finetune.DELTAS["lora"]
    torch.manual_seed(0)
    model = finetune.load_backbone(path, device)
    delta_model = AutoDeltaModel.from_config({"delta_type": "lora", **arguments}, model)
    delta_model.freeze_module(exclude=["deltas", *finetune.HEAD])
    ours = Run("fastdelta", model, list(delta_model.trainable_parameters()), lr)

    torch.manual_seed(0)
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=arguments["lora_r"],
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=PEFT_TARGETS,
        modules_to_save=list(finetune.HEAD),
    )
    peft_model = peft.get_peft_model(finetune.load_backbone(path, device), config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    theirs = Run("peft", peft_model, trainable, lr)
    if ours.model.num_parameters(only_trainable=True) != sum(p.numel() for p in trainable):
        raise RuntimeError("fastdelta and PEFT train different parameter counts")
    return ours, theirs


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=90, help="timed steps of each (default 90)")
    parser.add_argument("--chunk", type=int, default=10, help="steps before switching sides")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", help="a local model directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_arguments(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    finetune = _finetune_module()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = finetune.backbone_path(args.backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts, labels = finetune.load_reviews("train")
    runs = build_runs(finetune, path, device)
    generator = torch.Generator().manual_seed(0)
    every_batch = itertools.cycle(
        list(finetune.batches(texts, labels, tokenizer, args.batch_size, device, generator))
    )
    chunks = 1 + -(-args.steps // args.chunk)  # the warm-up chunk, then the timed ones
    for chunk in range(chunks):
        batches = list(itertools.islice(every_batch, args.chunk))
        for run in runs:
            run.steps(batches, timed=chunk > 0)
    ours, theirs = runs
    ratio = ours.steps_per_second / theirs.steps_per_second
    print(
        f"{ours.timed_steps} timed steps of batch {args.batch_size} each on {device} with "
        f"{torch.get_num_threads()} torch threads, alternating every {args.chunk} steps"
    )
    for run in runs:
        print(f"{run.name}: {run.steps_per_second:.2f} steps/s, last loss {run.loss:.4f}")
    print(f"fastdelta / PEFT steps/s: {ratio:.2f}x")
    return {
        "fastdelta_steps_per_second": ours.steps_per_second,
        "peft_steps_per_second": theirs.steps_per_second,
        "ratio": ratio,
        "fastdelta_loss": ours.loss,
        "peft_loss": theirs.loss,
    }


if __name__ == "__main__":
    main()
