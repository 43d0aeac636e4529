"""OpenDelta's own material, run as its users run it, with `opendelta` replaced by `fastdelta`.

The material is OpenDelta's repository (github.com/thunlp/OpenDelta, Apache-2.0, commit 067eed2,
version 0.3.2): examples/unittest/, examples/tutorial/, the API examples of README.md and
docs/source/notes/, and the 13 job configs of examples/examples_prompt/configs/, which
examples/examples_prompt/src/run.py turns into delta models. Each case adapts it minimally:
- `from opendelta import ...` becomes `from fastdelta import ...`, and `bigmodelvis`'s
  Visualization (OpenDelta's dependency) fastdelta's;
- `from_pretrained("t5-large")`-style loads build the same architecture tiny from a config
  (tests/tiny_models.py), with the layer count the material's layer indices need; a loaded
  pretrained model is a model built again with the same seed; token ids stand for tokenizers;
- DeltaCenter ids ("thunlp/Spelling_Correction_T5_LRAdapter_demo") become a checkpoint
  directory made here (there is no network);
- training loops are cut to a step; printing and visualization are kept.
Each case asserts what the material shows works: where the deltas go, a forward and backward
pass, which parameters train, and save/load round trips where the material saves.

Left out: examples/tutorial/0_interactive.py (the interactive page has its own tests,
test_interactive.py), 1_with_openprompt.py (needs OpenPrompt) and 2_with_bmtrain.py/.sh (need
BMTrain): neither library can be installed here. examples/unittest/test_main.py,
test_half_precision.py and test_accelerate.py are empty files in OpenDelta. The docs' blocks
that call no API (installation, citation, the common-structure figure) or need the network
(`save_finetuned(push_to_dc=True)` without delay_push uploads to DeltaCenter) are left out too.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from tiny_models import VOCAB, first_output, tiny_config
from torch import nn

from fastdelta import (
    AdapterConfig,
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    LoraModel,
    LowRankAdapterModel,
    Visualization,
)
from fastdelta.utils.inspect import inspect_optimizer_statistics

# Helpers

# Compacter's bottleneck (hidden // reduction_factor 16) must divide into hypercomplex_division
# 4 blocks: the real models' hidden sizes (768 and more) give 48 or more; a tiny 64 gives 4.
COMPACTER_HIDDEN = 64


def build(model_class, architecture: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny `model_class` of `architecture`: the stand-in for `from_pretrained`, so building it
    again with the same seed loads "the same pretrained weights"."""
    torch.manual_seed(seed)
    return model_class(tiny_config(architecture, **overrides)).eval()


def token_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB - 1, (batch, length), generator=generator)


def pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def outputs_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model(**inputs)).clone()


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def delta_ids(*delta_models) -> set[int]:
    return {id(p) for delta_model in delta_models for p in delta_model.parameters()}


def hosts(delta_model) -> list[str]:
    """The backbone modules carrying `delta_model`'s attached deltas, in order."""
    return sorted(a.host_name for a in delta_model.attachments if a.attached)


def modified_modules_of(delta_model) -> list[str]:
    """The modules `delta_model` modifies: those holding its parameters (BitFit's biases, on
    the module or in a bias layer after it; the soft prompt's embeddings, on the module whose
    input it extends), else those carrying its deltas."""
    if delta_model.delta_type not in ("bitfit", "soft_prompt"):
        return sorted(set(hosts(delta_model)))
    owners = set()
    for name, _ in delta_model.named_parameters():
        owner = name.rpartition(".")[0]
        for inserted in (".bitfit", "bitfit", ".soft_prompt_layer", "soft_prompt_layer"):
            if owner.endswith(inserted):
                owner = owner.removesuffix(inserted)
                break
        owners.add(owner)
    return sorted(owners)


# OpenDelta's name-based addressing (opendelta/utils/name_based_addressing.py, endswith_in):
# a name matches an entry it ends with at a "." boundary, or a "[r]" regular expression whose
# match ends the name at such a boundary. The expected modules are computed with it.
def opendelta_matches(name: str, entries: list[str]) -> bool:
    for entry in entries:
        if entry.startswith("[r]"):
            found = re.search(entry[3:], name)
            if found and found.end() == len(name):
                start = found.start()
                if start == 0 or name[start - 1] == ".":
                    return True
        elif name == entry or name.endswith("." + entry):
            return True
    return False


def modules_named(model: nn.Module, entries: list[str]) -> list[str]:
    return sorted(name for name, _ in model.named_modules() if opendelta_matches(name, entries))


def parameters_under(model: nn.Module, entries: list[str]) -> set[int]:
    """Parameters inside a module that `entries` name (a tied parameter under any of its names)."""
    named = modules_named(model, entries)
    return {
        id(parameter)
        for name, parameter in model.named_parameters(remove_duplicate=False)
        if any(name.startswith(module + ".") for module in named)
    }


def loss_of(outputs) -> torch.Tensor:
    loss = getattr(outputs, "loss", None)
    return first_output(outputs).square().mean() if loss is None else loss


def train_step(model: nn.Module, inputs: dict, steps: int = 1, run=None) -> torch.Tensor:
    """`steps` optimizer steps on the loss of `inputs` (labels inside), or of `run(model)`;
    every trainable parameter gets a gradient, and no frozen one."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model(**inputs)) if run is None else run(model)
        loss.backward()
        without = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not without, f"trainable parameters without a gradient: {without}"
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
    model.eval()
    assert torch.isfinite(loss)
    return loss


def pretend_trained(delta_model, seed: int = 0) -> None:
    """Give the deltas the nonzero values training would (several start at zero, and so change
    nothing: the cases compare outputs with and without them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta_model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


class WrappedModel(nn.Module):
    """README.md / must_try.py's wrapper of a pretrained model (a user's task model)."""

    def __init__(self, inner_model):
        super().__init__()
        self.inner = inner_model

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


# examples/unittest/must_try.py, and the README.md quick tour (the same code, without the last
# optimizer lines) and the DeltaCenter blocks of docs/source/notes/autodelta.md and
# deltacenter.md (its first half).


def t5_large(seed: int = 0) -> nn.Module:
    # t5-large: a ReLU T5 with 24 layers per stack (the material addresses decoder layers 20-23).
    return build(
        transformers.T5ForConditionalGeneration, "t5", seed, num_layers=24, num_decoder_layers=24
    )


def spelling_correction_demo(directory) -> str:
    """The DeltaCenter checkpoint "thunlp/Spelling_Correction_T5_LRAdapter_demo": a trained
    low-rank adapter (OpenDelta's default positions) on t5-large, saved as a directory."""
    delta = AutoDeltaModel.from_config(
        AutoDeltaConfig.from_dict({"delta_type": "low_rank_adapter"}), backbone_model=t5_large()
    )
    pretend_trained(delta)
    delta.save_finetuned(str(directory))
    return str(directory)


def test_must_try_and_readme(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t5 = t5_large()
    inputs_ids = token_ids(batch=1, length=9)
    decoder_input_ids = token_ids(batch=1, length=4, seed=2)

    def run(model):
        generated = model.generate(inputs_ids, max_new_tokens=4, do_sample=False)
        return generated, outputs_of(
            model, {"input_ids": inputs_ids, "decoder_input_ids": decoder_input_ids}
        )

    plain_tokens, plain_logits = run(t5)

    demo = spelling_correction_demo(tmp_path / "Spelling_Correction_T5_LRAdapter_demo")
    delta = AutoDeltaModel.from_finetuned(demo, backbone_model=t5)
    delta.freeze_module()
    delta.log()
    assert delta.delta_type == "low_rank_adapter"
    # OpenDelta's defaults: after each self-attention's output projection and feed-forward.
    assert hosts(delta) == modules_named(t5, ["SelfAttention.o", "wo"])
    assert trainable_ids(t5) == delta_ids(delta)
    tuned_tokens, tuned_logits = run(t5)
    assert not torch.allclose(tuned_logits, plain_logits)

    delta.save_finetuned(".tmp")
    assert {"config.json"} <= set(os.listdir(".tmp"))

    t5 = t5_large()
    delta1 = AutoDeltaModel.from_finetuned(".tmp", backbone_model=t5)
    shutil.rmtree(".tmp")
    tokens, logits = run(t5)
    assert torch.equal(tokens, tuned_tokens)
    torch.testing.assert_close(logits, tuned_logits)

    delta1.detach()
    tokens, logits = run(t5)
    assert torch.equal(tokens, plain_tokens)
    torch.testing.assert_close(logits, plain_logits)

    wrapped_model = WrappedModel(WrappedModel(t5))

    delta_config = AutoDeltaConfig.from_dict({"delta_type": "lora"})
    delta2 = AutoDeltaModel.from_config(delta_config, backbone_model=wrapped_model)
    delta2.log()
    # LoRA's default: the query and value projections of every self-attention.
    assert hosts(delta2) == modules_named(wrapped_model, ["SelfAttention.q", "SelfAttention.v"])
    assert len(hosts(delta2)) == 2 * 24 * 2
    delta2.detach()

    delta_config3 = AutoDeltaConfig.from_dict(
        {
            "delta_type": "lora",
            "modified_modules": [r"[r]decoder.*((20)|(21)|(22)|(23)).*DenseReluDense\.wi"],
            "lora_r": 5,
        }
    )
    delta3 = AutoDeltaModel.from_config(delta_config3, backbone_model=wrapped_model)
    delta3.freeze_module()
    delta3.log()
    assert hosts(delta3) == [
        f"inner.inner.decoder.block.{i}.layer.2.DenseReluDense.wi" for i in (20, 21, 22, 23)
    ]
    assert {tuple(p.shape) for p in delta3.parameters()} == {(5, 36), (52, 5)}
    assert trainable_ids(wrapped_model) == delta_ids(delta3)

    # transformers.AdamW (the material's import) is gone from transformers 5: torch's AdamW.
    optimizer = torch.optim.AdamW(wrapped_model.parameters(), lr=3e-3)
    stats = inspect_optimizer_statistics(optimizer)
    assert stats["trainable_parameters"] == sum(p.numel() for p in delta3.parameters())
    assert stats["total_parameters"] == sum(p.numel() for p in wrapped_model.parameters())
    labels = token_ids(batch=1, length=4, seed=3)
    train_step(wrapped_model, {"input_ids": inputs_ids, "labels": labels})


# examples/unittest/test_parallel_adapter.py


def test_parallel_adapter_on_a_wrapped_t5():
    t5 = build(transformers.T5ForConditionalGeneration, "t5")
    inputs = {"input_ids": token_ids(), "decoder_input_ids": token_ids(length=5, seed=2)}
    plain = outputs_of(t5, inputs)
    wrapped_model = WrappedModel(WrappedModel(t5))

    delta_config = AutoDeltaConfig.from_dict({"delta_type": "parallel_adapter"})
    delta2 = AutoDeltaModel.from_config(delta_config, backbone_model=wrapped_model)
    delta2.log()
    # OpenDelta's default: one adapter across each self-attention block, one across each
    # feed-forward (from its input projection's input to its output projection's output).
    assert len({a.target for a in delta2.attachments}) == 2 * 2 + 2 * 2
    assert {a.host_name for a in delta2.attachments} == set(
        modules_named(wrapped_model, ["layer.0", "wi", "wo"])
    )
    pretend_trained(delta2)
    assert not torch.allclose(outputs_of(wrapped_model, inputs), plain)
    delta2.detach()
    delta2.log()
    torch.testing.assert_close(outputs_of(wrapped_model, inputs), plain)
    assert not delta_ids(delta2) & {id(p) for p in wrapped_model.parameters()}


# examples/unittest/user_defined.py: UnitTest.Configs (each delta type's default config) through
# unitTest0 and unitTest1, on its default model, AutoModel.from_pretrained("bert-base-cased").

USER_DEFINED_CONFIGS = {
    0: {"delta_type": "lora"},
    1: {"delta_type": "bitfit"},
    2: {"delta_type": "adapter"},
    3: {"delta_type": "compacter"},
    4: {"delta_type": "prefix"},
    5: {"delta_type": "soft_prompt"},
    6: {"delta_type": "low_rank_adapter"},
}
# Where OpenDelta's default config of each type puts its deltas in a BertModel.
DEFAULT_HOSTS = {
    "lora": ["attention.self.query", "attention.self.value"],
    "bitfit": ["query", "key", "value", "dense", "LayerNorm"],
    "adapter": ["attention.output.dense", "[r]\\d+\\.output\\.dense"],
    "compacter": ["attention.output.dense", "[r]\\d+\\.output\\.dense"],
    "prefix": ["attention"],
    "low_rank_adapter": ["attention.output.dense", "[r]\\d+\\.output\\.dense"],
}


def bert_base_cased(seed: int = 0) -> nn.Module:
    # bert-base-cased's vocabulary and positions hold the soft prompt's 100 tokens, and its
    # hidden size Compacter's bottleneck (hidden // 16) in hypercomplex_division=4 blocks.
    return build(
        transformers.BertModel,
        "bert",
        seed,
        vocab_size=128,
        max_position_embeddings=160,
        hidden_size=COMPACTER_HIDDEN,
    )


def user_defined_models() -> list[nn.Module]:
    model = bert_base_cased()
    return [model, copy.deepcopy(model)]


def expected_default_hosts(model: nn.Module, delta_type: str, prefix: str = "") -> list[str]:
    if delta_type == "soft_prompt":
        return [prefix.rstrip(".")]  # the prompt goes in front of the model's input
    names = modules_named(model, DEFAULT_HOSTS[delta_type])
    return sorted(name for name in names if name.startswith(prefix + "encoder.layer."))


@pytest.mark.parametrize("config_id", sorted(USER_DEFINED_CONFIGS))
def test_user_defined_unit_test_0(config_id):
    delta_config_dict = USER_DEFINED_CONFIGS[config_id]
    model = user_defined_models()[0]
    Visualization(model).structure_graph()

    delta_config = AutoDeltaConfig.from_dict(delta_config_dict)
    delta_model = AutoDeltaModel.from_config(delta_config, backbone_model=model)

    Visualization(model).structure_graph()
    delta_type = delta_config_dict["delta_type"]
    assert modified_modules_of(delta_model) == expected_default_hosts(model, delta_type)
    delta_model.freeze_module()
    assert trainable_ids(model) == delta_ids(delta_model)
    inputs = {"input_ids": token_ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    train_step(model, inputs)


@pytest.mark.parametrize("config_id", sorted(set(USER_DEFINED_CONFIGS) - {5}))
def test_user_defined_unit_test_1(tmp_path, monkeypatch, config_id):
    monkeypatch.chdir(tmp_path)
    delta_config_dict = USER_DEFINED_CONFIGS[config_id]
    models = user_defined_models()

    class Mymodel(nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a = a
            self.b = b

    model = Mymodel(models[0], models[1])
    Visualization(model).structure_graph()

    delta_config = AutoDeltaConfig.from_dict(delta_config_dict)
    delta_model = AutoDeltaModel.from_config(delta_config, backbone_model=model)

    Visualization(model).structure_graph()
    delta_type = delta_config_dict["delta_type"]
    expected = expected_default_hosts(model, delta_type, "a.")
    expected += expected_default_hosts(model, delta_type, "b.")
    assert modified_modules_of(delta_model) == sorted(expected)
    delta_model.save_finetuned("./tmp")

    delta_model.freeze_module(exclude=["deltas"])
    assert trainable_ids(model) == delta_ids(delta_model)
    pretend_trained(delta_model)
    delta_model.save_finetuned("./tmp")
    saved = [tensor.clone() for tensor in delta_model.state_dict().values()]

    if delta_type in ("prefix", "bitfit"):
        # The material loads onto the very modules that carry the first deltas. In OpenDelta a
        # second prefix on an attention extends its attention mask again while the first
        # supplies the only past key/values, so the reloaded model cannot run a forward; a
        # second BitFit model shares the first one's biases, so loading it overwrites what the
        # first trained (fastdelta refuses both by name). These cases load onto fresh copies
        # of bert-base-cased instead, the evident intent.
        models = user_defined_models()
    model = Mymodel(models[0], models[1])
    Visualization(model).structure_graph()
    delta_model = AutoDeltaModel.from_finetuned("./tmp", backbone_model=model)
    Visualization(model).structure_graph()
    loaded = list(delta_model.state_dict().values())
    assert len(loaded) == len(saved)
    assert all(torch.equal(a, b) for a, b in zip(loaded, saved, strict=True))
    inputs = {"input_ids": token_ids()}
    train_step(
        model, inputs, run=lambda model: loss_of(model.a(**inputs)) + loss_of(model.b(**inputs))
    )


def test_user_defined_unit_test_1_soft_prompt_needs_input_embeddings():
    # unitTest1 with config 5: OpenDelta's SoftPromptModel calls
    # backbone_model.get_input_embeddings(), which Mymodel (two models, no forward) lacks, and
    # raises AttributeError; fastdelta refuses it too.
    class Mymodel(nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a = a
            self.b = b

    models = user_defined_models()
    model = Mymodel(models[0], models[1])
    delta_config = AutoDeltaConfig.from_dict(USER_DEFINED_CONFIGS[5])
    with pytest.raises((AttributeError, TypeError, ValueError)):
        AutoDeltaModel.from_config(delta_config, backbone_model=model)
    assert not any("soft_prompt" in name for name, _ in model.named_modules())


# examples/tutorial/0_basic.py and 0_regex.py


def bart_base(seed: int = 0) -> nn.Module:
    return build(transformers.BartForSequenceClassification, "bart", seed, num_labels=2)


def bart_inputs(labels: bool = True) -> dict:
    input_ids = token_ids()
    input_ids[:, -1] = 2  # the classification head reads the end-of-sequence token's state
    inputs = {"input_ids": input_ids}
    if labels:
        inputs["labels"] = torch.tensor([0, 1])
    return inputs


def test_tutorial_0_basic():
    model = bart_base()
    print("before modify")
    Visualization(model).structure_graph()

    delta_model = LoraModel(backbone_model=model, modified_modules=["fc2"])
    print("after modify")
    delta_model.log()
    assert hosts(delta_model) == [
        f"model.{stack}.layers.{i}.fc2" for stack in ("decoder", "encoder") for i in range(2)
    ]

    delta_model.freeze_module(exclude=["deltas", "layernorm_embedding"], set_state_dict=True)
    print("after freeze")
    delta_model.log()
    expected = delta_ids(delta_model) | parameters_under(model, ["layernorm_embedding"])
    assert trainable_ids(model) == expected
    # set_state_dict=True: the backbone's state_dict holds just the trainable parameters.
    state = model.state_dict()
    assert {id(model.get_parameter(name)) for name in state} == expected
    train_step(model, bart_inputs())


def test_tutorial_0_regex():
    model = build(transformers.RobertaForSequenceClassification, "roberta", num_labels=2)
    print("before modify")
    Visualization(model).structure_graph()

    delta_model = LoraModel(
        backbone_model=model, modified_modules=[r"[r](\d)+\.output.dense", "attention.output.dense"]
    )
    print("after modify")
    delta_model.log()
    assert hosts(delta_model) == sorted(
        f"roberta.encoder.layer.{i}.{place}.dense"
        for i in range(2)
        for place in ("attention.output", "output")
    )
    delta_model.freeze_module()
    train_step(model, {"input_ids": token_ids(), "labels": torch.tensor([0, 1])})


# docs/source/notes/quickstart.md


def test_docs_quickstart(tmp_path):
    def bert_large_cased():
        return build(transformers.BertForSequenceClassification, "bert", num_labels=2)

    model = bert_large_cased()
    delta_model = AdapterModel(model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    assert trainable_ids(model) == delta_ids(delta_model) | parameters_under(model, ["classifier"])
    assert hosts(delta_model) == expected_default_hosts(model, "adapter", "bert.")

    batch = {"input_ids": token_ids(), "labels": torch.tensor([0, 1])}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_function = nn.CrossEntropyLoss()
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        targets = batch["labels"]
        outputs = model(input_ids=batch["input_ids"]).logits
        loss = loss_function(outputs, targets)
        loss.backward()
        optimizer.step()
        print(loss)
    model.eval()
    assert torch.isfinite(loss)

    delta_model.save_finetuned(str(tmp_path / "finetuned_bert"))
    fresh = bert_large_cased()
    torch.manual_seed(1)
    fresh.classifier.reset_parameters()  # a new head: the checkpoint holds the trained one
    AutoDeltaModel.from_finetuned(str(tmp_path / "finetuned_bert"), backbone_model=fresh)
    inputs = {"input_ids": batch["input_ids"]}
    torch.testing.assert_close(outputs_of(fresh, inputs), outputs_of(model, inputs))


# docs/source/notes/custom.md


def test_docs_custom_usage(tmp_path):
    model = bart_base()
    Visualization(model).structure_graph()

    delta_model = AdapterModel(backbone_model=model, modified_modules=["fc2"], bottleneck_dim=12)
    delta_model.log()
    assert hosts(delta_model) == modules_named(model, ["fc2"])
    assert {tuple(p.shape) for p in delta_model.parameters()} >= {(12, 36), (36, 12)}

    # "Try different positions": the adapter after the feed-forward's layer norm instead.
    other = bart_base()
    moved = AdapterModel(
        backbone_model=other, modified_modules=["final_layer_norm"], bottleneck_dim=12
    )
    assert hosts(moved) == modules_named(other, ["final_layer_norm"])

    delta_model.freeze_module(exclude=["deltas", "layernorm_embedding"])
    delta_model.log()
    delta_model.freeze_module(exclude=["deltas", "layernorm_embedding"], set_state_dict=True)
    expected = delta_ids(delta_model) | parameters_under(model, ["layernorm_embedding"])
    assert trainable_ids(model) == expected

    train_step(model, bart_inputs())
    inputs = bart_inputs(labels=False)
    trained = outputs_of(model, inputs)

    # Option 1: save_finetuned, from_finetuned onto a fresh bart-base.
    delta_model.save_finetuned(str(tmp_path / "some_local_path"))
    model1 = bart_base()
    AutoDeltaModel.from_finetuned(str(tmp_path / "some_local_path"), backbone_model=model1)
    torch.testing.assert_close(outputs_of(model1, inputs), trained)

    # Option 2: torch.save the (trimmed) state_dict, load it with strict=False into a fresh
    # bart-base carrying the same delta model.
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    model2 = bart_base()
    AdapterModel(backbone_model=model2, modified_modules=["fc2"], bottleneck_dim=12)
    model2.load_state_dict(torch.load(tmp_path / "pytorch_model.bin"), strict=False)
    torch.testing.assert_close(outputs_of(model2, inputs), trained)


# docs/source/notes/autodelta.md (its DeltaCenter block is must_try.py's)


def test_docs_autodelta_from_dict():
    backbone_model = build(transformers.T5ForConditionalGeneration, "t5")
    config_dict = {
        "delta_type": "lora",
        "modified_modules": ["SelfAttention.q", "SelfAttention.v", "SelfAttention.o"],
        "lora_r": 4,
    }
    delta_config = AutoDeltaConfig.from_dict(config_dict)
    delta_model = AutoDeltaModel.from_config(delta_config, backbone_model=backbone_model)
    # The material calls `Visualizaiton(...)`, a NameError in OpenDelta as well.
    Visualization(backbone_model).structure_graph()
    assert hosts(delta_model) == modules_named(backbone_model, config_dict["modified_modules"])
    assert len(hosts(delta_model)) == 2 * 2 * 3
    assert {tuple(p.shape) for p in delta_model.parameters()} == {(4, 36), (36, 4)}
    delta_model.freeze_module()
    train_step(backbone_model, {"input_ids": token_ids(), "labels": token_ids(length=5, seed=2)})


# docs/source/notes/composition.md


def test_docs_composition_of_different_deltas():
    model = build(transformers.RobertaForSequenceClassification, "roberta", num_labels=2)
    delta_model = LoraModel(backbone_model=model, modified_modules=["key"], lora_r=1)
    delta_model2 = AdapterModel(
        backbone_model=model, modified_modules=["output"], bottleneck_dim=12
    )
    delta_model.log()
    assert hosts(delta_model) == modules_named(model, ["key"])
    assert len(hosts(delta_model)) == 2
    assert hosts(delta_model2) == modules_named(model, ["output"])
    assert len(hosts(delta_model2)) == 4  # attention.output and output of each layer
    delta_model.freeze_module()
    assert delta_ids(delta_model, delta_model2) <= trainable_ids(model)
    train_step(model, {"input_ids": token_ids(), "labels": torch.tensor([0, 1])})


def test_docs_composition_of_deltas_on_one_layer():
    model = bart_base()
    inputs = bart_inputs(labels=False)
    plain = outputs_of(model, inputs)
    delta_model = AdapterModel(backbone_model=model, modified_modules=["fc2"])
    delta_model2 = AdapterModel(backbone_model=model, modified_modules=["fc2"], bottleneck_dim=12)
    delta_model3 = LowRankAdapterModel(
        backbone_model=model, modified_modules=["fc2"], reduction_factor=12
    )
    delta_model.log()
    fc2s = modules_named(model, ["fc2"])
    for each in (delta_model, delta_model2, delta_model3):
        assert hosts(each) == fc2s
        pretend_trained(each)
    all_three = outputs_of(model, inputs)
    # "The delta that is first added should be the last to be detached."
    delta_model3.detach()
    two = outputs_of(model, inputs)
    delta_model2.detach()
    delta_model.detach()
    torch.testing.assert_close(outputs_of(model, inputs), plain)
    assert not torch.allclose(two, all_three)
    delta_model.attach()
    delta_model2.attach()
    torch.testing.assert_close(outputs_of(model, inputs), two)


# docs/source/notes/inspect.md


def test_docs_inspect(capsys):
    backbone_model = build(transformers.BertForMaskedLM, "bert")
    print(backbone_model)

    model_vis = Visualization(backbone_model)
    model_vis.structure_graph()
    # The material prints `.intermdiate`, an AttributeError in OpenDelta as well.
    print(backbone_model.bert.encoder.layer[0].intermediate)

    delta_model = LowRankAdapterModel(backbone_model)
    delta_model.freeze_module(exclude=["cls", "intermediate", "LayerNorm"])
    capsys.readouterr()
    Visualization(backbone_model).structure_graph()
    shown = capsys.readouterr().out
    Visualization(backbone_model).structure_graph(keep_non_params=True)
    with_non_params = capsys.readouterr().out
    assert "low_rank_adapter" in shown
    # keep_non_params shows the modules without parameters, such as dropout layers.
    assert "Dropout" not in shown
    assert "Dropout" in with_non_params

    assert hosts(delta_model) == expected_default_hosts(backbone_model, "low_rank_adapter", "bert.")
    # The exclude list leaves out "deltas": the deltas are frozen with the rest, as in OpenDelta.
    assert trainable_ids(backbone_model) == parameters_under(
        backbone_model, ["cls", "intermediate", "LayerNorm"]
    )


# docs/source/notes/namebasedaddr.md


class MyNet1(nn.Module):
    def __init__(self):
        super().__init__()
        self.name_a = nn.Linear(5, 5)

    def forward(self, hiddens):
        return self.name_a(hiddens)


class MyNet2(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 5)
        self.name_b = nn.Sequential(MyNet1(), MyNet1())

    def forward(self, input_ids):
        hiddens = self.embedding(input_ids)
        return self.name_b(hiddens)


def test_docs_name_based_addressing_toy_net():
    torch.manual_seed(0)
    root = MyNet2()
    print(root.name_b[0].name_a)
    Visualization(root).structure_graph()

    delta_model = AdapterModel(backbone_model=root, modified_modules=["name_b.0.name_a"])
    Visualization(root).structure_graph()
    assert hosts(delta_model) == ["name_b.0.name_a"]
    delta_model.freeze_module()
    input_ids = torch.tensor([[1, 2, 3]])
    root(input_ids).sum().backward()
    assert all(p.grad is not None for p in delta_model.parameters())
    assert trainable_ids(root) == delta_ids(delta_model)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (["0.attention.out_lin"], ["distilbert.transformer.layer.0.attention.out_lin"]),
        (
            ["attention.out_lin"],
            [f"distilbert.transformer.layer.{i}.attention.out_lin" for i in range(2)],
        ),
    ],
)
def test_docs_name_based_addressing_end_matching(entries, expected):
    model = build(transformers.DistilBertForSequenceClassification, "distilbert", num_labels=2)
    delta_model = LoraModel(backbone_model=model, modified_modules=entries)
    assert hosts(delta_model) == expected


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (
            [r"[r](\d)+\.output.dense"],
            [f"roberta.encoder.layer.{i}.output.dense" for i in range(8)],
        ),
        ([r"[r][0-5]\.attention"], [f"roberta.encoder.layer.{i}.attention" for i in range(6)]),
        (
            ["attention.output.dense"],
            [f"roberta.encoder.layer.{i}.attention.output.dense" for i in range(8)],
        ),
        # "In json, you should write "\\." instead of "\." for a real dot."
        (
            json.loads(r'["[r][0-5]\\.attention"]'),
            [f"roberta.encoder.layer.{i}.attention" for i in range(6)],
        ),
    ],
)
def test_docs_name_based_addressing_regex(entries, expected):
    # An 8-layer RoBERTa, so that "[r][0-5]\.attention" leaves layers 6 and 7 out.
    model = build(
        transformers.RobertaForSequenceClassification, "roberta", num_labels=2, num_hidden_layers=8
    )
    delta_model = AdapterModel(backbone_model=model, modified_modules=entries)
    assert hosts(delta_model) == sorted(expected)


# docs/source/notes/pluginunplug.md


def test_docs_plug_and_unplug():
    model = bart_base()
    inputs = bart_inputs(labels=False)
    plain = outputs_of(model, inputs)
    delta_model = LoraModel(backbone_model=model, modified_modules=["fc2"])
    pretend_trained(delta_model)
    delta_model.log()
    with_lora = outputs_of(model, inputs)
    assert not torch.allclose(with_lora, plain)

    delta_model.detach()
    delta_model.log()
    torch.testing.assert_close(outputs_of(model, inputs), plain)

    # OpenDelta 0.3.2's attach() raises NotImplementedError for its inserted deltas (it checks
    # for the method "insert_parallel" where it recorded "parallel"); the page shows what
    # attach is for, which fastdelta does.
    delta_model.attach()
    delta_model.log()
    torch.testing.assert_close(outputs_of(model, inputs), with_lora)

    delta_model2 = AdapterModel(backbone_model=model, modified_modules=["fc1"])
    pretend_trained(delta_model2, seed=1)
    delta_model2.log()
    both = outputs_of(model, inputs)
    assert hosts(delta_model2) == modules_named(model, ["fc1"])

    delta_model.detach()
    delta_model.log()
    adapter_only = outputs_of(model, inputs)
    assert not torch.allclose(adapter_only, both)
    assert not torch.allclose(adapter_only, plain)

    delta_model2.detach()
    delta_model.attach()
    delta_model.log()
    torch.testing.assert_close(outputs_of(model, inputs), with_lora)


# examples/examples_prompt: the job configs through run.py.
#
# From OpenDelta (Apache-2.0), examples/examples_prompt/configs/<job>/<task>.json: the keys of
# each that concern the delta model (the rest configure data, training and evaluation), with
# model_name_or_path, whose basename picks run.py's backbone loader.
JOB_CONFIGS = {
    "adapter_clip-vit-base-patch32/beans": {
        "bottleneck_dim": 24,
        "delta_type": "adapter",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/clip-vit-base-patch32",
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
    },
    "adapter_opt-350m/wikitext": {
        "backbone_model": "opt",
        "bottleneck_dim": 24,
        "delta_type": "adapter",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/opt-350m",
        "model_path_public": "opt-350m",
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": ["self_attn"],
    },
    "adapter_vit-large-patch16-224-in21k/beans": {
        "backbone_model": "vit",
        "bottleneck_dim": 24,
        "delta_type": "adapter",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/vit-large-patch16-224-in21k",
        "model_path_public": "vit-large-patch16-224-in21k",
        "num_classes": 3,
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": ["output"],
    },
    "bitfit_t5-large/rte": {
        "backbone_model": "t5-large",
        "delta_type": "bitfit",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/t5-large",
        "model_path_public": "t5-large",
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": ["attn", "ff", "layer_norm"],
    },
    "compacter_blenderbot-3b/sst2": {
        "backbone_model": "blenderbot",
        "delta_type": "compacter",
        "factorized_phm": True,
        "factorized_phm_rule": False,
        "gradient_clip": False,
        "hypercomplex_adapters": True,
        "hypercomplex_division": 4,
        "hypercomplex_nonlinearity": "glorot-uniform",
        "learn_phm": True,
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/blenderbot-3b",
        "model_path_public": "blenderbot-3b",
        "non_linearity": "gelu_new",
        "normalize_phm_weight": False,
        "phm_c_init": "normal",
        "phm_clamp": False,
        "phm_init_range": 0.0001,
        "shared_phm_rule": False,
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "use_bias_down_sampler": True,
        "use_bias_up_sampler": True,
        "modified_modules": ["fc2"],
    },
    "compacter_deberta-v2-xlarge/mnli": {
        "backbone_model": "deberta-v2-xlarge",
        "delta_type": "compacter",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/deberta-v2-xlarge",
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": ["attention"],
    },
    "compacter_long-t5-tglobal-large/rte": {
        "backbone_model": "long-t5",
        "delta_type": "compacter",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/long-t5-tglobal-large",
        "model_path_public": "long-t5-tglobal-large",
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": ["attn", "ff", "layer_norm"],
    },
    "lora_beit-large-patch16-224/cifar10": {
        "backbone_model": "beit",
        "delta_type": "lora",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/beit-large-patch16-224",
        "model_path_public": "beit-large-patch16-224",
        "num_classes": 10,
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": ["query", "value"],
    },
    "lora_gpt-j-6B/wikitext": {
        "backbone_model": "gpt-j",
        "delta_type": "lora",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/gpt-j-6B",
        "model_path_public": "gpt-j-6B",
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": [f"{layer}.attn.q_proj" for layer in range(20, 28)],
    },
    "lora_roberta-large/superglue-boolq": {
        "backbone_model": "roberta-large",
        "delta_type": "lora",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/roberta-large",
        "model_path_public": "roberta-large",
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": ["query", "value"],
    },
    "lora_xlm-roberta-large/superglue-wic": {
        "backbone_model": "xlm-roberta-large",
        "delta_type": "lora",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/xlm-roberta-large",
        "model_path_public": "xlm-roberta-large",
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": ["query", "value"],
    },
    "low_rank_adapter_gpt2/wikitext": {
        "backbone_model": "gpt2",
        "delta_type": "low_rank_adapter",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/gpt2",
        "model_path_public": "gpt2",
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": ["attn", "mlp"],
    },
    "prefix_bert-large-cased/rte": {
        "backbone_model": "bert-large-cased",
        "delta_type": "prefix",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/bert-large-cased",
        "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
        "modified_modules": ["attention"],
    },
    "soft_prompt_bart-large/superglue-boolq": {
        "backbone_model": "bart",
        "delta_type": "soft_prompt",
        "model_name_or_path": "/mnt/sfs_turbo/hsd/plm_cache/bart-large",
        "model_path_public": "bart-large",
        "soft_token_num": 100,
        "token_init": True,
        "unfrozen_modules": ["deltas"],
    },
}

# examples/examples_prompt/utils/args.py: DeltaArguments' fields and defaults, and the fields of
# each delta type's arguments class (DELTAARGMAP) that the parser merges into it.
DELTA_ARGUMENTS = {
    "delta_type": "",
    "backbone_model": "",
    "model_path_public": "",
    "modified_modules": None,
    "unfrozen_modules": ["deltas"],
    "finetuned_delta_path": None,
    "force_download": False,
    "local_files_only": False,
    "delta_cache_dir": None,
    "delay_push": True,
}
DELTA_TYPE_ARGUMENTS = {
    "adapter": {"bottleneck_dim": 24},
    "lora": {"lora_r": 8},
    "prefix": {},
    "bitfit": {},
    "soft_prompt": {"soft_token_num": 100},
    "compacter": {},
    "low_rank_adapter": {},
}


def run_py_delta_args(job: dict) -> dict:
    """`asdict(delta_args)` in run.py: the parser keeps a config's keys that are fields of
    DeltaArguments or of the delta type's arguments class (the others, Compacter's
    hypercomplex_division or the soft prompt's token_init among them, land in the unused
    arguments run.py logs); fields the config leaves out keep their defaults."""
    fields = {**DELTA_ARGUMENTS, **DELTA_TYPE_ARGUMENTS[job["delta_type"]]}
    return {key: copy.deepcopy(job.get(key, default)) for key, default in fields.items()}


@dataclass
class Backbone:
    """What run.py's get_backbone (examples_prompt/backbones/<name>.py) loads, built tiny."""

    model_class: type
    architecture: str
    overrides: dict
    inputs: Callable[[], dict]

    def build(self, seed: int = 0) -> nn.Module:
        return build(self.model_class, self.architecture, seed, **self.overrides)


def lm_inputs() -> dict:
    ids = token_ids()
    return {"input_ids": ids, "labels": ids}


def seq2seq_inputs() -> dict:
    return {"input_ids": token_ids(), "labels": token_ids(length=5, seed=2)}


def image_inputs(classes: int):
    return lambda: {"pixel_values": pixels(), "labels": torch.tensor([0, classes - 1])}


def clip_inputs() -> dict:
    return {"input_ids": token_ids(), "pixel_values": pixels(), "return_loss": True}


BACKBONES = {
    # backbones/clip.py: CLIPModel.
    "adapter_clip-vit-base-patch32/beans": Backbone(
        transformers.CLIPModel, "clip", {}, clip_inputs
    ),
    # backbones/opt.py (OPT and GPT models): AutoModelForCausalLM.
    "adapter_opt-350m/wikitext": Backbone(transformers.OPTForCausalLM, "opt", {}, lm_inputs),
    # backbones/vit.py is an empty file in OpenDelta, and run.py has no branch for "vit-...";
    # an image classifier as backbones/beit.py loads one (AutoModelForImageClassification).
    "adapter_vit-large-patch16-224-in21k/beans": Backbone(
        transformers.ViTForImageClassification, "vit", {"num_labels": 3}, image_inputs(3)
    ),
    # backbones/t5.py (T5 and LongT5): AutoModelForSeq2SeqLM.
    "bitfit_t5-large/rte": Backbone(
        transformers.T5ForConditionalGeneration, "t5", {}, seq2seq_inputs
    ),
    # backbones/blenderbot.py: BlenderbotForConditionalGeneration.
    "compacter_blenderbot-3b/sst2": Backbone(
        transformers.BlenderbotForConditionalGeneration,
        "blenderbot",
        {"d_model": COMPACTER_HIDDEN},
        seq2seq_inputs,
    ),
    # backbones/bert.py (BERT, RoBERTa, XLM-R, DeBERTa): AutoModelForMaskedLM.
    "compacter_deberta-v2-xlarge/mnli": Backbone(
        transformers.DebertaV2ForMaskedLM,
        "deberta-v2",
        {"hidden_size": COMPACTER_HIDDEN},
        lm_inputs,
    ),
    "compacter_long-t5-tglobal-large/rte": Backbone(
        transformers.LongT5ForConditionalGeneration,
        "longt5",
        {"d_model": COMPACTER_HIDDEN},
        seq2seq_inputs,
    ),
    # backbones/beit.py: AutoModelForImageClassification with a new classifier of num_classes.
    "lora_beit-large-patch16-224/cifar10": Backbone(
        transformers.BeitForImageClassification, "beit", {"num_labels": 10}, image_inputs(10)
    ),
    # gpt-j-6B has 28 layers; the config modifies layers 20-27.
    "lora_gpt-j-6B/wikitext": Backbone(
        transformers.GPTJForCausalLM, "gptj", {"n_layer": 28}, lm_inputs
    ),
    "lora_roberta-large/superglue-boolq": Backbone(
        transformers.RobertaForMaskedLM, "roberta", {}, lm_inputs
    ),
    "lora_xlm-roberta-large/superglue-wic": Backbone(
        transformers.XLMRobertaForMaskedLM, "xlm-roberta", {}, lm_inputs
    ),
    "low_rank_adapter_gpt2/wikitext": Backbone(transformers.GPT2LMHeadModel, "gpt2", {}, lm_inputs),
    "prefix_bert-large-cased/rte": Backbone(transformers.BertForMaskedLM, "bert", {}, lm_inputs),
    # backbones/bart.py: AutoModelForSeq2SeqLM. bart-large's vocabulary and positions hold the
    # 100 soft tokens (token_init takes the embeddings of the vocabulary's first 100).
    "soft_prompt_bart-large/superglue-boolq": Backbone(
        transformers.BartForConditionalGeneration,
        "bart",
        {"vocab_size": 128, "max_position_embeddings": 160},
        seq2seq_inputs,
    ),
}

# transformers 5 renamed the modules of ViT and BEiT that the configs (written for transformers
# 4) name: the attention's `query`/`value` are `q_proj`/`v_proj`; ViT's `attention.output` and
# `output` (each layer's attention and feed-forward output projections) are `o_proj` and
# `mlp.fc2`. The entries for transformers 5 names.
RENAMED_IN_TRANSFORMERS_5 = {
    "adapter_vit-large-patch16-224-in21k/beans": ["o_proj", "fc2"],
    "lora_beit-large-patch16-224/cifar10": ["q_proj", "v_proj"],
}
# OpenDelta 0.3.2 has no common-structure map for CLIP: the CLIP job (no modified_modules)
# raises KeyError in CommonStructureMap in OpenDelta, and fastdelta refuses it too (tested in
# test_job_config_clip_needs_modified_modules); the case runs with the modules OpenDelta's
# adapter default would name (attention output projection, feed-forward output) in CLIP.
CLIP_MODULES = ["out_proj", "fc2"]


def job_delta_args(job_name: str) -> dict:
    delta_args = run_py_delta_args(JOB_CONFIGS[job_name])
    if job_name in RENAMED_IN_TRANSFORMERS_5:
        delta_args["modified_modules"] = RENAMED_IN_TRANSFORMERS_5[job_name]
    if job_name == "adapter_clip-vit-base-patch32/beans":
        delta_args["modified_modules"] = CLIP_MODULES
    return delta_args


def expected_job_hosts(model: nn.Module, delta_args: dict) -> list[str]:
    if delta_args["delta_type"] == "soft_prompt":
        return ["model.encoder"]  # in front of the encoder's input, as OpenDelta's
    return sorted(
        name
        for name in modules_named(model, delta_args["modified_modules"])
        if not name.startswith("lm_head")  # OpenDelta's default exclude_modules
    )


@pytest.mark.parametrize("job_name", sorted(JOB_CONFIGS))
def test_job_config(tmp_path, job_name):
    backbone = BACKBONES[job_name]
    delta_args = job_delta_args(job_name)
    model = backbone.build()
    Visualization(model).structure_graph()
    expected_hosts = expected_job_hosts(model, delta_args)

    # run.py
    with pytest.warns(UserWarning, match="delay_push"):  # the non-delta keys, left out
        delta_config = AutoDeltaConfig.from_dict(delta_args)
    delta_model = AutoDeltaModel.from_config(delta_config, backbone_model=model)
    delta_model.freeze_module(set_state_dict=True)
    delta_model.log(delta_ratio=True, trainable_ratio=True, visualization=True)

    assert modified_modules_of(delta_model) == expected_hosts
    assert expected_hosts
    unfrozen = [entry for entry in delta_args["unfrozen_modules"] if entry != "deltas"]
    # fastdelta honours unfrozen_modules exactly: a module of OpenDelta's default
    # exclude_modules (["lm_head"], RoBERTa's lm_head.layer_norm) is unfrozen when named too.
    assert trainable_ids(model) == delta_ids(delta_model) | parameters_under(model, unfrozen)
    assert set(model.state_dict()) == {n for n, p in model.named_parameters() if p.requires_grad}

    inputs = backbone.inputs()
    train_step(model, inputs)
    no_labels = {k: v for k, v in inputs.items() if k not in ("labels", "return_loss")}
    if "labels" in inputs and model.config.is_encoder_decoder:
        no_labels["decoder_input_ids"] = inputs["labels"]
    trained = outputs_of(model, no_labels)

    # run.py's save_finetuned call, with a directory (delta_args.finetuned_delta_path is None in
    # every config, which OpenDelta's save_finetuned cannot take either) and without
    # push_to_dc (see test_run_py_save_call_with_delayed_push).
    finetuned_delta_path = str(tmp_path / "delta")
    delta_model.save_finetuned(
        finetuned_delta_path=finetuned_delta_path,
        center_args={"test_performance": 0.5},
        center_args_pool={**JOB_CONFIGS[job_name], **delta_args},
        list_tags=["NLI"],
        dict_tags={"purpose": "for testing"},
        delay_push=True,
        test_result={"task": {"test_average_metrics": 0.5}},
    )

    # src/test.py reloads the checkpoint onto a fresh backbone (with AdapterConfig and
    # AdapterModel whatever the delta type: the Auto classes for the other types).
    fresh = backbone.build()
    config_class, model_class = (
        (AdapterConfig, AdapterModel)
        if delta_args["delta_type"] == "adapter"
        else (AutoDeltaConfig, AutoDeltaModel)
    )
    delta_config = config_class.from_finetuned(finetuned_delta_path=finetuned_delta_path)
    reloaded = model_class.from_finetuned(
        finetuned_delta_path=finetuned_delta_path,
        delta_config=delta_config,
        backbone_model=fresh,
        force_download=delta_args["force_download"],
        cache_dir=delta_args["delta_cache_dir"],
    )
    reloaded.log(delta_ratio=True, trainable_ratio=True, visualization=True)
    torch.testing.assert_close(outputs_of(fresh, no_labels), trained)


def test_job_config_clip_needs_modified_modules():
    # The CLIP job as run.py passes it: no modified_modules, so the adapter's default positions,
    # which need a common-structure map. OpenDelta 0.3.2 has none for CLIP (KeyError); fastdelta
    # neither, and its error says how to name the modules instead.
    model = BACKBONES["adapter_clip-vit-base-patch32/beans"].build()
    delta_args = run_py_delta_args(JOB_CONFIGS["adapter_clip-vit-base-patch32/beans"])
    assert delta_args["modified_modules"] is None
    with pytest.warns(UserWarning, match="delay_push"):
        delta_config = AutoDeltaConfig.from_dict(delta_args)
    with pytest.raises(ValueError, match="modified_modules"):
        AutoDeltaModel.from_config(delta_config, backbone_model=model)
    assert not any(name.endswith("adapter") for name, _ in model.named_modules())


def test_job_config_compacter_arguments():
    # The Compacter jobs carry Compacter's hyperparameters, which run.py's parser drops (its
    # CompacterArguments has no field); passed to from_dict, the ones OpenDelta's
    # CompacterConfig takes are used and the others (gradient_clip, ...) left out.
    job = JOB_CONFIGS["compacter_blenderbot-3b/sst2"]
    with pytest.warns(UserWarning, match="gradient_clip"):
        config = AutoDeltaConfig.from_dict(job)
    used = [
        key for key in job if hasattr(config, key) and key not in ("delta_type", "modified_modules")
    ]
    assert sorted(used) == [
        "factorized_phm",
        "factorized_phm_rule",
        "hypercomplex_division",
        "hypercomplex_nonlinearity",
        "learn_phm",
        "non_linearity",
        "phm_c_init",
        "phm_init_range",
        "shared_phm_rule",
        "unfrozen_modules",
        "use_bias_down_sampler",
        "use_bias_up_sampler",
    ]
    assert all(getattr(config, key) == job[key] for key in used)
    model = BACKBONES["compacter_blenderbot-3b/sst2"].build()
    delta_model = AutoDeltaModel.from_config(config, backbone_model=model)
    assert hosts(delta_model) == modules_named(model, ["fc2"])
    delta_model.freeze_module()
    train_step(model, seq2seq_inputs())


def test_run_py_save_call_with_delayed_push(tmp_path):
    # run.py saves with push_to_dc=training_args.push_to_dc (true in the configs) and
    # delay_push=True: OpenDelta then saves locally and writes the DeltaCenter card, leaving
    # the upload to a later `python -m DeltaCenter upload`.
    job_name = "lora_roberta-large/superglue-boolq"
    model = BACKBONES[job_name].build()
    delta_args = job_delta_args(job_name)
    with pytest.warns(UserWarning, match="delay_push"):
        delta_config = AutoDeltaConfig.from_dict(delta_args)
    delta_model = AutoDeltaModel.from_config(delta_config, backbone_model=model)
    delta_model.freeze_module(set_state_dict=True)
    delta_model.log(delta_ratio=True, trainable_ratio=True, visualization=True)
    path = tmp_path / "delta"
    delta_model.save_finetuned(
        finetuned_delta_path=str(path),
        push_to_dc=True,
        center_args={"test_performance": 0.5},
        center_args_pool={**JOB_CONFIGS[job_name], **delta_args},
        list_tags=["NLI"],
        dict_tags={"purpose": "for testing"},
        delay_push=True,
        test_result={"superglue-boolq": {"test_average_metrics": 0.5}},
    )
    # OpenDelta writes the checkpoint into a subdirectory named after the DeltaCenter card.
    (saved,) = {root for root, _, files in os.walk(path) if "config.json" in files}
    fresh = BACKBONES[job_name].build()
    AutoDeltaModel.from_finetuned(saved, backbone_model=fresh)
    inputs = {"input_ids": token_ids()}
    torch.testing.assert_close(outputs_of(fresh, inputs), outputs_of(model, inputs))
