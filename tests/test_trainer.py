"""DeltaTrainer: a delta model trains with transformers' Trainer, its checkpoints hold only the
trainable tensors, and resuming from one gives the weights of an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_inputs, tiny_model
from transformers import Trainer, TrainingArguments

from fastdelta import AutoDeltaModel, DeltaTrainer, LoraModel
from fastdelta.integrations import load_delta_checkpoint

EXAMPLES, BATCH, EPOCHS = 24, 4, 2
STEPS = EXAMPLES // BATCH * EPOCHS  # 12


class Examples(torch.utils.data.Dataset):
    """Random token sequences of a tiny BERT with binary labels (the first token's parity)."""

    def __init__(self, size: int = EXAMPLES):
        inputs = tiny_inputs("bert", batch=size, length=9, seed=5)
        self.input_ids = inputs["input_ids"]
        self.labels = self.input_ids[:, 0] % 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        input_ids = self.input_ids[index]
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": self.labels[index],
        }


def lora_model(seed: int = 0, lora_r: int = 4):
    """A tiny BERT classifier with LoRA on query and value; `seed` draws the LoRA weights."""
    model = tiny_model("bert", "classification")
    torch.manual_seed(seed)
    delta_model = LoraModel(model, modified_modules=["query", "value"], lora_r=lora_r)
    delta_model.freeze_module()
    return model, delta_model


def training_arguments(output_dir, **overrides) -> TrainingArguments:
    arguments = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": BATCH,
        "num_train_epochs": EPOCHS,
        "learning_rate": 1e-2,
        "save_strategy": "steps",
        "save_steps": 4,
        "logging_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(**arguments)


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A full DeltaTrainer run with a checkpoint every 4 steps: (output_dir, final weights)."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    model, delta_model = lora_model()
    initial = trainable_tensors(model)
    trainer = DeltaTrainer(
        delta_model=delta_model,
        args=training_arguments(output_dir),
        train_dataset=Examples(),
    )
    trainer.train()
    final = trainable_tensors(model)
    assert any(not torch.equal(final[name], initial[name]) for name in initial)
    return output_dir, final


def test_checkpoints_hold_the_trainable_tensors_only(uninterrupted):
    output_dir, final = uninterrupted
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name[11:]))
    assert [path.name for path in checkpoints] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    for checkpoint in checkpoints:
        assert not list(checkpoint.glob("model*.safetensors")), "a full model was saved"
        assert not list(checkpoint.glob("pytorch_model*")), "a full model was saved"
        assert set(load_file(checkpoint / "delta.safetensors")) == set(final)
        assert (checkpoint / "optimizer.pt").is_file()
    # The last checkpoint holds exactly the weights the run ended with.
    assert_same_tensors(load_file(checkpoints[-1] / "delta.safetensors"), final)


def test_checkpoint_loads_onto_a_fresh_backbone(uninterrupted):
    output_dir, final = uninterrupted
    trained, delta_model = lora_model()
    load_delta_checkpoint(delta_model, output_dir / f"checkpoint-{STEPS}")
    fresh = tiny_model("bert", "classification")
    AutoDeltaModel.from_finetuned(output_dir / f"checkpoint-{STEPS}", backbone_model=fresh)

    inputs = tiny_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, trained(**inputs).logits)
    assert_same_tensors(trainable_tensors(fresh), final)


def test_resuming_gives_the_weights_of_the_uninterrupted_run(uninterrupted, tmp_path):
    output_dir, expected = uninterrupted
    # Other initial LoRA weights: only loading the checkpoint can make the runs agree.
    model, delta_model = lora_model(seed=1)
    trainer = DeltaTrainer(
        delta_model=delta_model, args=training_arguments(tmp_path), train_dataset=Examples()
    )
    trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-4"))

    assert trainer.state.global_step == STEPS
    assert_same_tensors(trainable_tensors(model), expected)


def test_save_model_writes_a_delta_checkpoint(tmp_path):
    model, delta_model = lora_model()
    trainer = DeltaTrainer(delta_model=delta_model, args=training_arguments(tmp_path / "run"))
    trainer.save_model(str(tmp_path / "final"))

    fresh = tiny_model("bert", "classification")
    reloaded = AutoDeltaModel.from_finetuned(tmp_path / "final", backbone_model=fresh)
    assert reloaded.config == delta_model.config
    assert_same_tensors(trainable_tensors(fresh), trainable_tensors(model))


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    model, delta_model = lora_model()
    # "Best" is the highest evaluation loss, so that it is not the last checkpoint.
    arguments = training_arguments(
        tmp_path,
        eval_strategy="steps",
        eval_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer = DeltaTrainer(
        delta_model=delta_model,
        args=arguments,
        train_dataset=Examples(),
        eval_dataset=Examples(8),
    )
    trainer.train()

    best = trainer.state.best_model_checkpoint
    assert best is not None
    assert not best.endswith(f"checkpoint-{STEPS}")
    assert_same_tensors(trainable_tensors(model), load_file(f"{best}/delta.safetensors"))


def test_resuming_with_other_delta_arguments_names_them(uninterrupted, tmp_path):
    output_dir, _ = uninterrupted
    _, delta_model = lora_model(lora_r=2)
    trainer = DeltaTrainer(
        delta_model=delta_model, args=training_arguments(tmp_path), train_dataset=Examples()
    )
    with pytest.raises(ValueError, match=r"lora_r=4 there, 2 here"):
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-4"))


def test_resuming_from_a_full_model_checkpoint_is_refused(tmp_path):
    _, delta_model = lora_model()
    full_model = tiny_model("bert", "classification")  # a plain Trainer's whole model
    plain = Trainer(model=full_model, args=training_arguments(tmp_path / "plain"))
    plain.save_model(str(tmp_path / "plain-checkpoint"))
    trainer = DeltaTrainer(delta_model=delta_model, args=training_arguments(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"not a fastdelta delta config"):
        trainer._load_from_checkpoint(str(tmp_path / "plain-checkpoint"))


def test_a_plain_trainer_cannot_save_a_trimmed_backbone_and_names_delta_trainer(tmp_path):
    model, _ = lora_model()  # freeze_module(): the state dict holds the trainable tensors only
    plain = Trainer(model=model, args=training_arguments(tmp_path / "plain"))
    with pytest.raises(RuntimeError, match=r"save_finetuned.*DeltaTrainer"):
        plain.save_model(str(tmp_path / "plain-checkpoint"))


def test_an_unfrozen_backbone_is_refused(tmp_path):
    model = tiny_model("bert", "classification")
    delta_model = LoraModel(model)
    with pytest.raises(ValueError, match=r"call delta_model\.freeze_module\(\)"):
        DeltaTrainer(delta_model=delta_model, args=training_arguments(tmp_path))


def test_a_model_other_than_the_backbone_is_refused(tmp_path):
    _, delta_model = lora_model()
    other = tiny_model("bert", "classification")
    with pytest.raises(ValueError, match=r"model is not the backbone of delta_model"):
        DeltaTrainer(other, delta_model=delta_model, args=training_arguments(tmp_path))


def test_a_star_import_leaves_the_trainer_unimported():
    # OpenDelta scripts start with `from opendelta import *`; importing transformers' Trainer
    # would triple the import time, so DeltaTrainer stays out of __all__ and loads on first use.
    code = (
        "import sys\nfrom fastdelta import *\n"
        "assert 'LoraModel' in dir() and 'DeltaTrainer' not in dir()\n"
        "assert 'transformers.trainer' not in sys.modules\n"
        "import fastdelta\nassert fastdelta.DeltaTrainer.__name__ == 'DeltaTrainer'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
