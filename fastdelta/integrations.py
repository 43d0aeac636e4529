"""HuggingFace Trainer integration: checkpoints that hold the deltas only, and resuming from them.

`DeltaTrainer` is a `transformers.Trainer` that trains the backbone of a delta model and writes
each checkpoint (`checkpoint-<step>/`, `save_model()`) as a fastdelta delta checkpoint:
`config.json` + `delta.safetensors` with the trainable tensors (the deltas and a task head),
beside the optimizer, scheduler, RNG and trainer state that the Trainer writes itself. A
checkpoint loads with `AutoDeltaModel.from_finetuned(path, backbone_model=...)`, and
`trainer.train(resume_from_checkpoint=...)` and `load_best_model_at_end` read it back with every
key and shape checked. The plain Trainer would save the whole backbone (or, after
`freeze_module()`, a `model.safetensors` that `from_pretrained` cannot use) and load it back
with `strict=False`.

    trainer = DeltaTrainer(delta_model=delta_model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from fastdelta.checkpoint_io import CONFIG_NAME
from fastdelta.delta_models import checkpoint
from fastdelta.delta_models.base import DeltaBase

# What transformers.Trainer names its saved TrainingArguments.
TRAINING_ARGS_NAME = "training_args.bin"


def load_delta_checkpoint(delta_model: DeltaBase, path: str | Path) -> None:
    """Load the delta checkpoint at `path` (written by `save_finetuned`) into `delta_model`,
    whose deltas must be built with the same arguments on the same kind of backbone."""
    if not (Path(path) / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a delta checkpoint (no config.json): resume from a "
            "checkpoint that DeltaTrainer wrote"
        )
    checkpoint.load_into(delta_model, path)


class DeltaTrainer(Trainer):
    """A `transformers.Trainer` for the backbone of `delta_model` whose checkpoints are delta
    checkpoints (the trainable tensors only).

    `delta_model` is keyword-only; `model` may be left out (it is the delta model's backbone)
    and every other argument is the Trainer's. Call `delta_model.freeze_module()` before: the
    Trainer's optimizer takes the parameters that require gradients. Checkpoints are written
    from the process that saves (rank 0) without gathering, so FSDP and DeepSpeed, which shard
    the parameters, are refused; distributed data parallel training (torchrun, accelerate
    launch) works.
    """

    def __init__(self, model: nn.Module | None = None, *args, delta_model: DeltaBase, **kwargs):
        if not isinstance(delta_model, DeltaBase):
            raise TypeError(
                f"delta_model must be a fastdelta delta model (LoraModel, ...), got "
                f"{type(delta_model).__name__}"
            )
        if model is None:
            model = delta_model.backbone_model
        elif model is not delta_model.backbone_model:
            raise ValueError(
                "model is not the backbone of delta_model: pass model=delta_model.backbone_model, "
                "or leave model out"
            )
        if kwargs.get("model_init") is not None:
            raise ValueError(
                "DeltaTrainer trains the backbone that delta_model modified, so model_init (a new "
                "model per run) cannot be used; build a DeltaTrainer per run instead"
            )
        if all(parameter.requires_grad for parameter in model.parameters()):
            raise ValueError(
                "Every parameter of the backbone is trainable, so the Trainer would fine-tune all "
                "of it: call delta_model.freeze_module() before building the DeltaTrainer"
            )
        self.delta_model = delta_model
        super().__init__(model, *args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise NotImplementedError(
                "DeltaTrainer saves delta checkpoints from unsharded parameters, so it does not "
                "run under FSDP or DeepSpeed; train with distributed data parallel (the default "
                "of torchrun and accelerate launch): the deltas are small enough to replicate"
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the delta checkpoint (and the tokenizer and training arguments) to `output_dir`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.delta_model.save_finetuned(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        """Load the delta checkpoint of `resume_from_checkpoint` into the delta model."""
        load_delta_checkpoint(self.delta_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """Load the delta checkpoint of the best model (`load_best_model_at_end`)."""
        load_delta_checkpoint(self.delta_model, self.state.best_model_checkpoint)
