"""Mixed batches (`fastdelta.adapter_ids`): each sample of a batch runs its own named deltas.

The reference is running each sample's name alone (`set_active(model, name)`) on that name's
samples: the mixed batch's outputs, the gradients of every delta parameter and of the input
embeddings, and training steps must equal it. With LoRA dropout, the fused op draws each row's
mask as `lora_linear` on the whole batch would (same seed, same shape), so the reference there
is each name alone on the whole batch, its loss on its own samples.
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from composition import owned_parameters, randomize
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fastdelta
from fastdelta import (
    AdapterModel,
    BitFitModel,
    CompacterModel,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
    active_deltas,
    adapter_ids,
    set_active,
)
from fastdelta.ops import multi_lora_functional

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ARCHITECTURES = ("bert", "gpt2", "llama")
# No dropout inside the backbones: the LoRA dropout tests train them with their deltas'.
NO_DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama": {},
}
Q_AND_W2 = ["attn@.q@", "ff@.w2@"]
# Delta models per scenario: (class, arguments); named by their `name` argument.
SCENARIOS = {
    # Ranks, alphas and targets that differ between names; c is attached but in no batch.
    "lora": [
        (LoraModel, {"name": "a", "lora_r": 4, "lora_alpha": 8}),
        (LoraModel, {"name": "b", "lora_r": 2, "lora_alpha": 5, "modified_modules": Q_AND_W2}),
        (LoraModel, {"name": "c", "lora_r": 3, "use_rslora": True}),
    ],
    # Adapters, the factored ones too, one name in no batch (d).
    "adapter": [
        (AdapterModel, {"name": "a", "bottleneck_dim": 6}),
        (AdapterModel, {"name": "b", "bottleneck_dim": 3, "modified_modules": ["ff@.w2@"]}),
        (CompacterModel, {"name": "c", "reduction_factor": 9}),
        (LowRankAdapterModel, {"name": "c", "modified_modules": ["attn@.proj@"]}),
        (AdapterModel, {"name": "d", "bottleneck_dim": 4}),
    ],
    # Kinds together: a LoRA and an adapter under one name (its samples run both), a parallel
    # adapter spanning the attention block, and LoRAs stacked on the adapter's layers.
    "kinds": [
        (LoraModel, {"name": "a", "lora_r": 4, "modified_modules": ["attn@.q@", "attn@.proj@"]}),
        (AdapterModel, {"name": "a", "bottleneck_dim": 5}),
        (LoraModel, {"name": "b", "lora_r": 2, "modified_modules": ["attn@.proj@", "ff@.w2@"]}),
        (ParallelAdapterModel, {"name": "c", "bottleneck_dim": 4}),
    ],
}
LABELS = ["a", None, "b", "a", "b"]
LABELS_KINDS = ["c", "a", None, "b", "a", "c"]
SCENARIO_LABELS = {"lora": LABELS, "adapter": LABELS_KINDS, "kinds": LABELS_KINDS}


@functools.cache
def _pristine(arch: str) -> nn.Module:
    return tiny_model(arch, **NO_DROPOUT[arch])


def built(arch: str, scenario: str, seed: int = 0, **overrides) -> nn.Module:
    """A fresh tiny `arch` backbone with the scenario's delta models, frozen for training, their
    deltas nudged (a fresh LoRA's B is zero)."""
    model = copy.deepcopy(_pristine(arch)).eval()
    torch.manual_seed(seed)  # the deltas' initialisation
    for index, (cls, arguments) in enumerate(SCENARIOS[scenario]):
        delta_model = cls(model, **{**arguments, **overrides})
        delta_model.freeze_module()
        randomize(owned_parameters(delta_model), seed + index, std=0.2)
    return model


def batch(arch: str, model: nn.Module, size: int) -> dict:
    """Keyword inputs of `size` samples, with input embeddings that take a gradient."""
    inputs = tiny_inputs(arch, batch=size)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
    return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}


def projection(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Fixed weights for a loss whose gradient is not near zero, shaped as the output."""
    with torch.no_grad():
        shape = first_output(model(**inputs)).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


def delta_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def zero_grads(model: nn.Module, inputs: dict) -> None:
    model.zero_grad(set_to_none=True)
    inputs["inputs_embeds"].grad = None


def mixed_run(model, inputs, labels, weights, forward=None, **options):
    """The output and gradients (delta parameters, input embeddings) of the mixed batch;
    `forward` calls the model (a compiled one, say)."""
    zero_grads(model, inputs)
    with adapter_ids(model, labels, **options):
        output = first_output((model if forward is None else forward)(**inputs))
        (output * weights).sum().backward()
    return output.detach(), delta_grads(model), inputs["inputs_embeds"].grad.clone()


def separate_runs(model, inputs, labels, weights):
    """The same from each name alone (set_active) on its own samples."""
    zero_grads(model, inputs)
    before = active_deltas(model)
    output = torch.zeros_like(weights)
    for label in dict.fromkeys(labels):
        rows = torch.tensor([i for i, other in enumerate(labels) if other == label])
        set_active(model, label)
        part = first_output(model(**{key: value[rows] for key, value in inputs.items()}))
        (part * weights[rows]).sum().backward()
        output[rows] = part.detach()
    set_active(model, before)
    return output, delta_grads(model), inputs["inputs_embeds"].grad.clone()


def close(actual: torch.Tensor, expected: torch.Tensor, **options) -> None:
    """Equal to float32 rounding, relative to the tensor's scale (Llama's gradients reach
    hundreds; other batch sizes sum in other orders)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, **options)


def assert_runs_equal(actual, expected, stacked_without_samples: bool = False) -> None:
    """Outputs and gradients equal; a delta whose name ran on no sample has no gradient, or,
    with `stacked_without_samples` (names=[...] stacks every name given), a zero one."""
    (output, grads, embeds_grad), (expected_output, expected_grads, expected_embeds) = (
        actual,
        expected,
    )
    close(output, expected_output)
    close(embeds_grad, expected_embeds)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        if expected_grads[name] is None:
            if stacked_without_samples and grad is not None:
                assert torch.all(grad == 0), f"{name}: its name ran on no sample"
                continue
            assert grad is None, f"{name} got a gradient, but its name ran on no sample"
        else:
            assert grad is not None, f"{name} got no gradient"
            close(grad, expected_grads[name], msg=lambda m, n=name: f"{n}: {m}")


# 1. Outputs and gradients equal each name's own run


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_mixed_batch_equals_each_name_run_alone_on_its_samples(arch, scenario):
    model = built(arch, scenario)
    labels = SCENARIO_LABELS[scenario]
    inputs = batch(arch, model, len(labels))
    weights = projection(model, inputs)
    expected = separate_runs(model, inputs, labels, weights)
    assert_runs_equal(mixed_run(model, inputs, labels, weights), expected)
    # Positions in a list of names, as a data loader would carry them, compute the same.
    names = ["b", "d", "a", "c"] if scenario == "adapter" else ["b", "a", "c"]
    ids = torch.tensor([-1 if label is None else names.index(label) for label in labels])
    actual = mixed_run(model, inputs, ids, weights, names=names)
    assert_runs_equal(actual, expected, stacked_without_samples=True)


def test_lora_layers_run_one_fused_op_and_share_the_batch_s_segments(monkeypatch):
    model = built("bert", "lora")
    inputs = batch("bert", model, len(LABELS))
    calls, grouped = [], []
    original = fastdelta.ops.multi_lora_linear
    monkeypatch.setattr(
        fastdelta.ops, "multi_lora_linear", lambda *a, **k: calls.append(a) or original(*a, **k)
    )
    original_segments = multi_lora_functional.adapter_segments
    monkeypatch.setattr(
        fastdelta.ops,
        "adapter_segments",
        lambda *a: grouped.append(a[1]) or original_segments(*a),
    )
    with torch.no_grad(), adapter_ids(model, LABELS):
        model(**inputs)
    hosts = [m for m in model.modules() if any(n.startswith("lora") for n in m._modules)]
    assert len(calls) == len(hosts)  # one op per LoRA layer, whatever its names
    # Grouped once per set of names a layer has (a and b; a alone; b alone), not per layer.
    assert sorted(grouped) == [1, 1, 2]
    stacked = {tuple(call[3].shape) for call in calls}
    assert (2, 4, 36) in stacked  # a (rank 4) and b (rank 2, zero-padded) on one query layer


def test_dora_embedding_and_same_name_stacked_loras_take_the_grouped_path():
    model = copy.deepcopy(_pristine("bert")).eval()
    for index, arguments in enumerate(
        [
            {"name": "a", "use_dora": True, "modified_modules": ["query"]},
            {"name": "b", "modified_modules": ["query", "word_embeddings"]},
            {"modified_modules": ["value"]},  # two unnamed models stack as "default"
            {"modified_modules": ["value"], "lora_r": 2},
        ]
    ):
        delta_model = LoraModel(model, **arguments)
        delta_model.freeze_module()
        randomize(owned_parameters(delta_model), index, std=0.2)
    labels = ["b", "default", "a", None, "b"]
    inputs = tiny_inputs("bert", batch=len(labels))
    with torch.no_grad(), adapter_ids(model, labels):
        mixed = first_output(model(**inputs))
    with torch.no_grad():
        for label in dict.fromkeys(labels):
            rows = [i for i, other in enumerate(labels) if other == label]
            set_active(model, label)
            alone = first_output(model(**{key: value[rows] for key, value in inputs.items()}))
            torch.testing.assert_close(mixed[rows], alone, rtol=1e-4, atol=1e-5)


# 2. Training


def test_gradient_checkpointing_recomputes_each_sample_s_name_inside_the_block():
    model = built("llama", "kinds")
    labels = SCENARIO_LABELS["kinds"]
    inputs = batch("llama", model, len(labels))
    weights = projection(model, inputs)
    expected = separate_runs(model, inputs, labels, weights)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing recomputes in training only; backward runs inside the block
    assert_runs_equal(mixed_run(model, inputs, labels, weights), expected)


@pytest.mark.parametrize("scenario", ["lora", "kinds"])
def test_training_steps_on_mixed_batches_change_each_delta_through_its_samples_only(scenario):
    mixed_model, separate_model = built("llama", scenario), built("llama", scenario)
    labels = SCENARIO_LABELS[scenario]
    optimizers = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1)
        for m in (mixed_model, separate_model)
    ]
    # The parameters of c, which no batch of the "lora" scenario runs.
    absent = {
        f"{host}.{name}": p.detach().clone()
        for host, delta in mixed_model.named_modules()
        if getattr(delta, "_fastdelta_name", None) == "c" and scenario == "lora"
        for name, p in delta.named_parameters()
    }
    for _ in range(3):
        inputs = batch("llama", mixed_model, len(labels))
        weights = projection(mixed_model, inputs)
        mixed_run(mixed_model, inputs, labels, weights)
        separate_runs(separate_model, inputs, labels, weights)
        for optimizer in optimizers:
            optimizer.step()
        labels = labels[1:] + labels[:1]  # other samples next step
    trained = dict(mixed_model.named_parameters())
    for name, parameter in separate_model.named_parameters():
        torch.testing.assert_close(trained[name], parameter, rtol=1e-4, atol=1e-6)
    for name, value in absent.items():  # no gradient, so AdamW's weight decay skips them
        assert trained[name].grad is None
        assert torch.equal(trained[name], value)
    assert absent or scenario != "lora"


# 3. Dropout


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_lora_dropout_draws_each_row_s_mask_as_the_name_alone_on_the_whole_batch(arch):
    model = built(arch, "lora", lora_dropout=0.3, modified_modules=["attn@.q@", "attn@.v@"])
    model.train()
    inputs = batch(arch, model, len(LABELS))
    weights = projection(model, inputs)
    torch.manual_seed(11)
    output, grads, embeds_grad = mixed_run(model, inputs, LABELS, weights)
    for label in dict.fromkeys(LABELS):
        rows = torch.tensor([i for i, other in enumerate(LABELS) if other == label])
        mask = torch.zeros(len(LABELS), 1, 1)
        mask[rows] = 1
        zero_grads(model, inputs)
        set_active(model, label)
        torch.manual_seed(11)  # the same seeds, layer by layer
        alone = first_output(model(**inputs))
        (alone * weights * mask).sum().backward()
        close(output[rows], alone[rows].detach())
        close(embeds_grad[rows], inputs["inputs_embeds"].grad[rows])
        for name, grad in delta_grads(model).items():
            if grad is not None:
                close(grads[name], grad)
    set_active(model, ["a", "b", "c"])


def test_lora_dropouts_that_differ_run_each_name_with_its_own(monkeypatch, caplog):
    """The fused op takes one dropout: names of different dropouts run one lora_linear per name
    on its rows, with that name's p (a mask of its rows' shape), which is unbiased: the mean over
    many draws is the output without dropout."""
    host = nn.Sequential(nn.Linear(24, 20)).eval()
    models = [
        LoraModel(host, modified_modules=["0"], lora_r=4, lora_dropout=p, name=name)
        for name, p in (("a", 0.2), ("b", 0.6))
    ]
    for index, delta_model in enumerate(models):
        randomize(owned_parameters(delta_model), index, std=0.5)
    x = torch.randn(6, 24)
    labels = ["a", "b", None, "b", "a", "a"]
    with torch.no_grad(), adapter_ids(host, labels):
        expected = host(x)  # eval mode: no dropout, the fused op
    host.train()
    calls = []
    original = fastdelta.ops.lora_linear
    monkeypatch.setattr(
        fastdelta.ops,
        "lora_linear",
        lambda x, *rest: calls.append((x.shape[0], rest[5])) or original(x, *rest),
    )
    with caplog.at_level(logging.INFO), torch.no_grad(), adapter_ids(host, labels):
        draws = torch.stack([host(x) for _ in range(4000)])
    assert sorted(set(calls)) == [(2, 0.6), (3, 0.2)]
    assert "different dropouts" in caplog.text
    assert torch.equal(draws[:, 2], draws[0, 2].expand_as(draws[:, 2]))  # no LoRA, no dropout
    assert not torch.allclose(draws[0], draws[1])
    standard_error = draws.std(0) / 4000**0.5
    assert torch.all((draws.mean(0) - expected).abs() <= 5 * standard_error + 1e-5)


# 4. torch.compile


@pytest.mark.parametrize("scenario", ["lora", "kinds"])
def test_torch_compile_does_not_recompile_when_the_ids_change(scenario):
    model = built("bert", scenario)
    inputs = batch("bert", model, len(LABELS))
    weights = projection(model, inputs)
    names = ["a", "b", "c"]
    batches = [LABELS, ["b", "b", "a", None, "c"], [None] * 5, ["c", "a", "a", "b", "a"]]
    expected = [mixed_run(model, inputs, labels, weights, names=names) for labels in batches]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    try:
        for round_ in range(2):
            for labels, reference in zip(batches, expected, strict=True):
                actual = mixed_run(model, inputs, labels, weights, compiled, names=names)
                # Compiled, deltas not LoRA run on every sample, masked: zero gradients.
                assert_runs_equal(actual, reference, stacked_without_samples=True)
            if round_ == 0:
                compiles = counter.frame_count
                assert compiles >= 1
        assert counter.frame_count == compiles
        # The same names on other samples (no names=): one graph for them, then no other.
        mixed_run(model, inputs, ["b", "a", "a", "b", None], weights, compiled)
        after_names = counter.frame_count
        mixed_run(model, inputs, ["a", None, None, "b", "b"], weights, compiled)
        assert counter.frame_count == after_names
    finally:
        torch._dynamo.reset()


# 5. Outside the block, other models, caches


def test_outside_the_block_nothing_changes_and_other_models_are_untouched():
    model, other = built("bert", "lora"), built("bert", "adapter", seed=7)
    inputs = tiny_inputs("bert", batch=3)
    with torch.no_grad(), adapter_ids(model, ["a", None, "c"]):
        every_name_active = first_output(model(**inputs))
    set_active(model, "b")
    with torch.no_grad():
        before, other_before = first_output(model(**inputs)), first_output(other(**inputs))
        with adapter_ids(model, ["a", None, "c"]):
            assert torch.equal(first_output(other(**inputs)), other_before)
            # The active set is set aside: each sample runs its name, active or not.
            assert torch.equal(first_output(model(**inputs)), every_name_active)
        assert torch.equal(first_output(model(**inputs)), before)
    assert active_deltas(model) == ["b"]
    assert fastdelta.injection.mixed_batch_in_effect() is None


def test_kept_stacks_follow_in_place_changes_of_the_weights():
    model = built("bert", "lora")
    inputs = tiny_inputs("bert", batch=len(LABELS))
    query = model.encoder.layer[0].attention.self.query
    with torch.no_grad():
        with adapter_ids(model, LABELS):
            first = first_output(model(**inputs))
        query.lora_1.lora_B.add_(0.5)  # b's, through the parameter (as an optimizer step)
        with adapter_ids(model, LABELS):
            second = first_output(model(**inputs))
        set_active(model, "b")
        alone = first_output(model(**{k: v[[2, 4]] for k, v in inputs.items()}))
    assert not torch.allclose(first[[2, 4]], second[[2, 4]])
    torch.testing.assert_close(second[[0, 1, 3]], first[[0, 1, 3]])
    torch.testing.assert_close(second[[2, 4]], alone, rtol=1e-4, atol=1e-5)


def test_generation_runs_each_sample_s_name():
    model = tiny_model("gpt2", kind="lm")
    for index, name in enumerate(("a", "b")):
        delta_model = LoraModel(model, name=name, lora_r=2 + index)
        randomize(owned_parameters(delta_model), index, std=0.5)
    inputs = tiny_inputs("gpt2", batch=3)
    labels = ["b", None, "a"]
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with adapter_ids(model, labels):
        mixed = model.generate(**inputs, **options)
    for index, label in enumerate(labels):
        set_active(model, label)
        alone = model.generate(**{k: v[index : index + 1] for k, v in inputs.items()}, **options)
        assert torch.equal(mixed[index : index + 1], alone)


# 6. Errors, raised where the mistake enters


@pytest.mark.parametrize(
    "ids, options, error, match",
    [
        (["a", "sql", None], {}, ValueError, r"'sql'.*attached ones are named 'a', 'b', 'c'"),
        ("a", {}, TypeError, "one delta model name .* per sample.*set_active"),
        (["a", 3], {}, TypeError, "a str\\) or None per sample, got 3"),
        ([], {}, ValueError, "got none"),
        (["bias"], {}, ValueError, "'bias' runs on every sample.*give None"),
        (torch.tensor([0, 1]), {}, TypeError, "names=\\[...\\]"),
        (torch.tensor([0, 3]), {"names": ["a", "b"]}, ValueError, r"in \[-1, 2\).*\[3\]"),
        (torch.tensor([0.0]), {"names": ["a"]}, ValueError, "1-D integer tensor"),
        (["a", "b"], {"names": ["a"]}, ValueError, "'b' is not among names"),
        (["a"], {"names": ["a", "a"]}, ValueError, "distinct"),
    ],
)
def test_bad_ids_are_refused_on_entry(ids, options, error, match):
    model = built("bert", "lora")
    BitFitModel(model, name="bias")
    with pytest.raises(error, match=match), adapter_ids(model, ids, **options):
        pytest.fail("entered")
    assert fastdelta.injection.mixed_batch_in_effect() is None


def test_merged_deltas_nested_blocks_and_a_wrong_batch_are_refused():
    model = built("bert", "lora")
    lora_a = LoraModel(model, name="d", modified_modules=["key"])
    lora_a.merge()
    with pytest.raises(RuntimeError, match=r"merged.*unmerge\(\) on delta model 'd'"):
        adapter_ids(model, ["a"]).__enter__()
    lora_a.unmerge()
    with adapter_ids(model, ["a", "d"]), pytest.raises(RuntimeError, match="cannot be detached"):
        lora_a.detach()
    inputs = tiny_inputs("bert", batch=2)
    with adapter_ids(model, ["a", "b"]):
        with pytest.raises(RuntimeError, match="already in effect"):
            adapter_ids(model, ["b", "a"]).__enter__()
        model(**inputs)  # the first block is still in effect
    message = (
        r"given 3 samples, but encoder\.layer\.0\.attention\.self\.query got a tensor of shape "
        r"\(2, 7, 36\)"
    )
    with pytest.raises(ValueError, match=message), adapter_ids(model, ["a", "b", None]):
        model(**inputs)
    with pytest.raises(TypeError, match="the backbone model"):
        adapter_ids(["a"], ["a"]).__enter__()
    query = model.encoder.layer[0].attention.self.query
    replica = query._replicate_for_data_parallel()  # what DataParallel runs on each device
    with adapter_ids(model, ["a"]), pytest.raises(RuntimeError, match="DataParallel's replicas"):
        replica(torch.randn(1, 3, 36))
