"""What PEFT users and newcomers do by habit works, or stops them with a message that says what
to do instead: `save_pretrained` of a backbone whose state dict freeze_module trimmed, PEFT's
AutoPeftModelFor* classes loading fastdelta's PEFT export, PEFT's helpers
(`print_trainable_parameters`, `get_nb_trainable_parameters`, `disable_adapter`) and argument
names, which head modules freeze_module keeps trainable (and `log()` saying why), and the mode of
the files save_finetuned writes.

Each test reproduces the user's step. Models are tiny, built from configs; a model "loaded"
here is saved with save_pretrained to a temporary directory and loaded from there, offline.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import re
import types
import warnings
from contextlib import redirect_stdout

import pytest
import torch
import transformers
from tiny_models import first_output, tiny_config, tiny_inputs, tiny_model
from torch import nn

from fastdelta import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    LoraConfig,
    LoraModel,
)
from fastdelta.layers.lora import LoraDelta

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(autouse=True)
def quiet_transformers():
    """transformers' load reports and progress bars, off for the test (and restored)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(verbosity)
    transformers.logging.enable_progress_bar()


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def saved_and_loaded(model: nn.Module, auto_class, directory, **kwargs) -> nn.Module:
    """`model` written with save_pretrained to `directory` and loaded back from there with
    `auto_class` (the model's name_or_path is then `directory`)."""
    model.save_pretrained(directory)
    return auto_class.from_pretrained(directory, **kwargs).eval()


@torch.no_grad()
def output(model: nn.Module, arch: str, kind: str = "base") -> torch.Tensor:
    return first_output(model(**tiny_inputs(arch, kind)))


def randomize_lora(delta_model, seed: int = 3) -> None:
    """Give every LoRA delta a non-zero B (a fresh one computes the plain model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attachment in delta_model.attachments:
            delta = attachment.delta
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=generator))


# 1. save_pretrained of a backbone whose state dict freeze_module trimmed


def test_save_pretrained_after_freeze_module_refuses_and_names_the_fix(tmp_path):
    model = tiny_model("bert", "classification")
    delta_model = LoraModel(model)
    delta_model.freeze_module()  # set_state_dict=True, OpenDelta's default
    with pytest.raises(RuntimeError) as error:
        model.save_pretrained(tmp_path / "model")
    message = str(error.value)
    for named in ("save_finetuned", "set_state_dict=False", "from_pretrained", "DeltaTrainer"):
        assert named in message
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_push_to_hub_after_freeze_module_refuses_before_uploading(monkeypatch):
    model = tiny_model("bert", "classification")
    LoraModel(model).freeze_module()
    hub = transformers.utils.hub
    repository = types.SimpleNamespace(
        create_repo=lambda *a, **k: types.SimpleNamespace(repo_id="me/m")
    )
    monkeypatch.setattr(hub, "hf_api", lambda: repository)
    monkeypatch.setattr(
        hub, "create_and_tag_model_card", lambda *a, **k: types.SimpleNamespace(save=print)
    )

    def upload(*args, **kwargs):
        raise AssertionError("push_to_hub uploaded a model that save_pretrained should refuse")

    monkeypatch.setattr(type(model), "_upload_modified_files", upload)
    with pytest.raises(RuntimeError, match="save_finetuned"):
        model.push_to_hub("me/m")


def test_torch_save_of_the_state_dict_keeps_only_the_trainable_tensors(tmp_path):
    model = tiny_model("bert", "classification")
    LoraModel(model).freeze_module()
    torch.save(model.state_dict(), tmp_path / "state.pt")  # the user's explicit choice
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert set(saved) == trainable


def test_an_explicit_state_dict_is_saved_as_given(tmp_path):
    model = tiny_model("bert", "classification")
    LoraModel(model).freeze_module()
    given = tiny_model("bert", "classification", seed=1)
    model.save_pretrained(tmp_path / "model", state_dict=dict(given.state_dict()))
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert torch.equal(reloaded.classifier.weight, given.classifier.weight)


@pytest.mark.parametrize(
    "undo",
    [
        lambda delta_model: delta_model.freeze_module(set_state_dict=False),
        lambda delta_model: delta_model.detach(),
        lambda delta_model: delta_model.merge_and_unload(),
    ],
    ids=["set_state_dict=False", "detach", "merge_and_unload"],
)
def test_save_pretrained_writes_the_whole_model_once_nothing_trims_it(tmp_path, undo):
    model = tiny_model("bert", "classification")
    delta_model = LoraModel(model)
    delta_model.freeze_module()
    undo(delta_model)
    model.save_pretrained(tmp_path / "model")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert torch.equal(
        reloaded.bert.embeddings.word_embeddings.weight,
        model.bert.embeddings.word_embeddings.weight,
    )
    assert "save_pretrained" not in model.__dict__


def test_the_refusal_survives_deepcopy_and_pickling_and_guards_the_copy(tmp_path):
    model = tiny_model("bert", "classification")
    LoraModel(model).freeze_module()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.save_pretrained.model is copied
        with pytest.raises(RuntimeError, match="set_state_dict=False"):
            copied.save_pretrained(tmp_path / "copy")


def test_two_delta_models_keep_the_refusal_until_neither_trims(tmp_path):
    model = tiny_model("bert", "classification")
    lora = LoraModel(model, modified_modules=["query"])
    adapter = AdapterModel(model, modified_modules=["output.dense"])
    lora.freeze_module()
    adapter.freeze_module()
    lora.freeze_module(set_state_dict=False)
    with pytest.raises(RuntimeError, match="save_finetuned"):
        model.save_pretrained(tmp_path / "model")
    adapter.freeze_module(set_state_dict=False)
    model.save_pretrained(tmp_path / "model")


# 2. PEFT's AutoPeftModelFor* classes load fastdelta's PEFT export


# {task type: (architecture, transformers auto class, PEFT auto class, kind of inputs)}
TASKS = {
    "SEQ_CLS": (
        "bert",
        "AutoModelForSequenceClassification",
        "AutoPeftModelForSequenceClassification",
        "classification",
    ),
    "TOKEN_CLS": (
        "bert",
        "AutoModelForTokenClassification",
        "AutoPeftModelForTokenClassification",
        "base",
    ),
    "QUESTION_ANS": (
        "bert",
        "AutoModelForQuestionAnswering",
        "AutoPeftModelForQuestionAnswering",
        "base",
    ),
    "CAUSAL_LM": ("llama", "AutoModelForCausalLM", "AutoPeftModelForCausalLM", "lm"),
    "SEQ_2_SEQ_LM": ("t5", "AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM", "lm"),
    "FEATURE_EXTRACTION": ("bert", "AutoModel", "AutoPeftModelForFeatureExtraction", "base"),
}


@pytest.mark.parametrize("task_type", TASKS)
def test_peft_auto_classes_load_the_peft_export(tmp_path, offline, task_type):
    arch, auto_name, peft_auto_name, kind = TASKS[task_type]
    auto_class = getattr(transformers, auto_name)
    peft = pytest.importorskip("peft")
    config = tiny_config(arch)
    torch.manual_seed(0)
    backbone = saved_and_loaded(auto_class.from_config(config), auto_class, tmp_path / "base")
    delta_model = LoraModel(backbone)
    delta_model.freeze_module()
    randomize_lora(delta_model)
    heads = [
        name for name, p in backbone.named_parameters() if p.requires_grad and "lora" not in name
    ]
    with torch.no_grad():
        for name in heads:  # a trained head, which the export must carry
            backbone.get_parameter(name).add_(0.5)
    expected = output(backbone, arch, kind)

    adapter = delta_model.save_finetuned(tmp_path / "adapter", format="peft")
    saved = peft.PeftConfig.from_pretrained(str(adapter))
    assert saved.task_type == task_type
    assert saved.base_model_name_or_path == str(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = getattr(peft, peft_auto_name).from_pretrained(str(adapter)).eval()
    torch.testing.assert_close(output(loaded, arch, kind), expected, rtol=1e-5, atol=1e-6)


def test_a_model_of_no_peft_task_gets_no_task_type(tmp_path):
    peft = pytest.importorskip("peft")
    delta_model = LoraModel(tiny_model("bert", "lm"))  # a masked LM: PEFT has no task for it
    delta_model.freeze_module()
    saved = peft.PeftConfig.from_pretrained(
        str(delta_model.save_finetuned(tmp_path, format="peft"))
    )
    assert saved.task_type is None


# 3. PEFT's helpers and argument names


def test_print_trainable_parameters_prints_peft_s_line():
    peft = pytest.importorskip("peft")
    ours = LoraModel(tiny_model("bert"), modified_modules=["query", "value"], lora_r=4)
    ours.freeze_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_model("bert"), peft.LoraConfig(r=4, target_modules=["query", "value"])
        )
    printed = {}
    for name, model in (("fastdelta", ours), ("peft", theirs)):
        with redirect_stdout(io.StringIO()) as stdout:
            model.print_trainable_parameters()
        printed[name] = stdout.getvalue()
    assert printed["fastdelta"] == printed["peft"]
    assert re.fullmatch(
        r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}\n",
        printed["fastdelta"],
    )
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_get_nb_trainable_parameters_counts_a_tied_parameter_once():
    model = tiny_model("gpt2", "lm")  # lm_head.weight is the embeddings' weight
    delta_model = LoraModel(model)
    delta_model.freeze_module()
    trainable, total = delta_model.get_nb_trainable_parameters()
    assert total == sum(parameter.numel() for parameter in model.parameters())
    assert trainable == delta_model.num_delta_parameters()


DELTA_CLASSES = {"lora": LoraModel, "adapter": AdapterModel, "bitfit": BitFitModel}


def trained(delta_class, model):
    delta_model = delta_class(model)
    delta_model.freeze_module()
    with torch.no_grad():
        for parameter in delta_model.trainable_parameters():
            parameter.add_(torch.randn_like(parameter))
    return delta_model


@pytest.mark.parametrize("delta_type", DELTA_CLASSES)
def test_disable_adapter_runs_the_base_model_inside_and_restores_after(delta_type):
    model = tiny_model("bert")
    plain = output(model, "bert")
    delta_model = trained(DELTA_CLASSES[delta_type], model)
    with_deltas = output(model, "bert")
    state_keys = set(model.state_dict())
    with delta_model.disable_adapter():
        assert torch.equal(output(model, "bert"), plain)
    assert torch.equal(output(model, "bert"), with_deltas)
    assert set(model.state_dict()) == state_keys  # still trimmed to the trainable tensors
    with pytest.raises(ZeroDivisionError), delta_model.disable_adapter():
        assert torch.equal(output(model, "bert"), plain)
        _ = 1 / 0
    assert torch.equal(output(model, "bert"), with_deltas)
    assert all(attachment.attached for attachment in delta_model.attachments)


def test_disable_adapter_leaves_detached_deltas_detached_and_merged_ones_merged():
    model = tiny_model("bert")
    plain = output(model, "bert")
    delta_model = trained(LoraModel, model)
    delta_model.detach(model.encoder.layer[0])
    delta_model.merge()
    expected = output(model, "bert")
    attached = [attachment.attached for attachment in delta_model.attachments]
    with delta_model.disable_adapter():
        torch.testing.assert_close(output(model, "bert"), plain)
    assert [attachment.attached for attachment in delta_model.attachments] == attached
    assert delta_model.merged
    torch.testing.assert_close(output(model, "bert"), expected)


def test_disable_adapter_with_nothing_attached_changes_nothing():
    model = tiny_model("bert")
    delta_model = trained(LoraModel, model)
    delta_model.detach()
    with delta_model.disable_adapter():
        pass
    assert not any(attachment.attached for attachment in delta_model.attachments)


def test_lora_takes_peft_s_argument_names():
    model = tiny_model("bert", "classification")
    delta_model = LoraModel(
        model, r=4, target_modules=["query", "value"], modules_to_save=["pooler"]
    )
    assert delta_model.config == LoraConfig(
        lora_r=4, modified_modules=["query", "value"], unfrozen_modules=["deltas", "pooler"]
    )
    assert {a.delta.lora_A.shape[0] for a in delta_model.attachments} == {4}
    delta_model.freeze_module()
    assert model.bert.pooler.dense.weight.requires_grad
    assert not model.classifier.weight.requires_grad  # modules_to_save is honoured exactly


def test_peft_s_regex_target_modules_selects_like_peft():
    model = tiny_model("bert")
    delta_model = LoraModel(model, target_modules=r".*layer\.1\.attention\.self\.(query|value)")
    assert sorted(a.host_name for a in delta_model.attachments) == [
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    ]


def test_peft_names_work_in_configs_and_are_stored_under_fastdelta_s():
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "r": 2, "target_modules": ["query"]})
    assert (config.lora_r, config.modified_modules) == (2, ["query"])
    stored = config.to_dict()
    assert "r" not in stored
    assert "target_modules" not in stored
    assert AutoDeltaModel.from_config(stored, tiny_model("bert")).config == config


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"r": 4, "lora_r": 16}, r"r is PEFT's name for fastdelta's lora_r.*give lora_r only"),
        (
            {"target_modules": ["query"], "modified_modules": ["value"]},
            "target_modules is PEFT's name for fastdelta's modified_modules",
        ),
        (
            {"modules_to_save": ["pooler"], "unfrozen_modules": ["deltas"]},
            "modules_to_save is PEFT's name for fastdelta's unfrozen_modules",
        ),
        ({"target_modules": "all-linear"}, "fastdelta names the layers in modified_modules"),
    ],
)
def test_clashing_or_unsupported_peft_names_are_refused_by_name(arguments, message):
    with pytest.raises(ValueError, match=message):
        LoraModel(tiny_model("bert"), **arguments)


# 4. freeze_module keeps a freshly initialised head trainable, and log() says why


def bert_classifier(tmp_path, with_pooler: bool) -> nn.Module:
    """A BERT classifier loaded from a checkpoint of a BERT base model, with or without a
    pooler (sentence encoders are saved without one)."""
    torch.manual_seed(0)
    base = transformers.BertModel(tiny_config("bert"), add_pooling_layer=with_pooler)
    return saved_and_loaded(
        base, transformers.AutoModelForSequenceClassification, tmp_path / "base", num_labels=3
    )


def trainable_outside_deltas(model: nn.Module) -> set[str]:
    return {
        name for name, p in model.named_parameters() if p.requires_grad and ".lora." not in name
    }


def printed_log(delta_model) -> str:
    with redirect_stdout(io.StringIO()) as stdout:
        delta_model.log(visualization=False)
    return stdout.getvalue()


def test_a_pooler_the_checkpoint_lacked_trains_with_the_classifier(tmp_path):
    model = bert_classifier(tmp_path, with_pooler=False)
    delta_model = LoraModel(model)
    delta_model.freeze_module()
    assert trainable_outside_deltas(model) == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }
    printed = printed_log(delta_model)
    assert "classifier: new task head of BertForSequenceClassification" in printed
    assert "bert.pooler: not in the checkpoint the model was loaded from" in printed


def test_a_pretrained_pooler_stays_frozen_as_in_peft_and_log_says_how_to_train_it(tmp_path):
    peft = pytest.importorskip("peft")
    model = bert_classifier(tmp_path, with_pooler=True)
    delta_model = LoraModel(model, modified_modules=["query", "value"])
    delta_model.freeze_module()
    assert trainable_outside_deltas(model) == {"classifier.weight", "classifier.bias"}
    printed = printed_log(delta_model)
    assert "classifier: new task head" in printed
    assert (
        'bert.pooler: part of the base model; freeze_module(exclude=["deltas", <head>, ' in printed
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"])
        peft_model = peft.get_peft_model(bert_classifier(tmp_path / "peft", True), config)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "pooler" in n)
    assert peft_model.get_nb_trainable_parameters()[0] == delta_model.num_trainable_parameters()


def test_log_names_what_an_explicit_exclude_kept_trainable(tmp_path):
    model = bert_classifier(tmp_path, with_pooler=True)
    delta_model = LoraModel(model)
    delta_model.freeze_module(exclude=["deltas", "classifier", "pooler"])  # as finetune.py does
    assert delta_model.kept_trainable == {
        "bert.pooler": "named in exclude",
        "classifier": "named in exclude",
    }
    printed = printed_log(delta_model)
    assert "bert.pooler: named in exclude" in printed
    assert "frozen" not in printed


# Files, messages


@pytest.mark.parametrize("format", ["fastdelta", "peft"])
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask(tmp_path, format, umask):
    delta_model = LoraModel(tiny_model("bert"))
    delta_model.freeze_module()
    previous = os.umask(umask)
    try:
        path = delta_model.save_finetuned(tmp_path / "checkpoint", format=format)
    finally:
        os.umask(previous)
    modes = {file.name: file.stat().st_mode & 0o777 for file in path.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_second_replacement_of_the_backbone_itself_names_it():
    model = nn.Sequential(nn.Linear(4, 4))
    delta_model = LoraModel(model, modified_modules=["0"], lora_r=2)
    delta_model.replace_module(model, nn.Identity(), "extra")
    with pytest.raises(
        ValueError, match=r"the backbone itself \(Sequential\) already has a 'extra'"
    ):
        delta_model.replace_module(model, nn.Identity(), "extra")


def test_a_second_lora_on_a_module_stacks_as_lora_1():
    model = tiny_model("bert")
    first = LoraModel(model, modified_modules=["layer.1.attention.self.query"])
    LoraModel(model, modified_modules=["query"])
    query = model.encoder.layer[1].attention.self.query
    assert isinstance(query.lora, LoraDelta) and isinstance(query.lora_1, LoraDelta)
    assert query.lora_1.stacked and not query.lora.stacked
    assert "lora_1" not in dict(model.encoder.layer[0].attention.self.query.named_children())
    assert first.backends() != {"eager (stacked on another LoRA)"}
