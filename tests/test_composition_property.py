"""Property: with all four delta types on one backbone, every sequence of detach / attach /
merge / unmerge / train / save / load leaves the backbone computing what the same deltas rebuilt
from scratch compute, and every checkpoint holds exactly its delta model's tensors and reloads to
what it saved.

A hypothesis state machine walks the operations on tiny BERT, GPT-2 and Llama models. The test
keeps its own record of each delta model (the values it gave each tensor, which modules are
detached, which LoRA deltas are merged) and, after every step, rebuilds the model from a pristine
backbone: the delta models in the order they were created, each on its attached modules only,
with the recorded values, nothing merged. Operations the record says must fail (saving with a
delta detached or merged, loading a type whose deltas are still attached, detaching nothing) are
checked to raise and to change nothing.

Cost: derandomized (the same walks on every run, no example database), EXAMPLES walks of up to
STEPS steps per architecture, about 1,200 steps in all (about 180 detach, 60 attach, 170 merge,
180 save and 50 load operations, a third of them refused as they must be), 45 s for the three
architectures on the 2-core CI machine. A failure shrinks to a short sequence of steps.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from composition import (
    DELTA_CLASSES,
    FIRST_LAYER,
    output,
    owned_by_host,
    owned_parameters,
    randomize,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from safetensors.torch import load_file
from tiny_models import tiny_model
from torch import nn

from fastdelta import AutoDeltaModel, DeltaBase
from fastdelta.layers.base import delta_parameter_names
from fastdelta.saving import WEIGHTS_NAME

ARCHITECTURES = ("bert", "gpt2", "llama")
KINDS = tuple(DELTA_CLASSES)
EXAMPLES = 40
STEPS = 12
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# The parallel adapter walks one-module pairs (each module's input to its output), whose hosts
# this test tracks one by one; pairs across two modules are test_parallel_adapter_pairs.py's.
PARALLEL_ADAPTER_MODULES = ["attn@", "attn@"]
# float32; merging rounds W + s B A once, so a merged model differs in the last bits.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@functools.cache
def pristine(architecture: str) -> nn.Module:
    return tiny_model(architecture)


@dataclass
class Record:
    """What the test knows of one delta model on the walked backbone."""

    kind: str
    delta_model: DeltaBase
    values: dict[str, dict[str, torch.Tensor]]  # host -> parameter name -> value
    detached: set[str] = field(default_factory=set)
    merged: set[str] = field(default_factory=set)

    @property
    def attached(self) -> list[str]:
        return [host for host in self.values if host not in self.detached]

    def snapshot(self) -> None:
        self.values = {
            host: {name: parameter.detach().clone() for name, parameter in parameters.items()}
            for host, parameters in owned_by_host(self.delta_model).items()
        }


def rebuild(architecture: str, records: list[Record]) -> nn.Module:
    """The backbone with the recorded deltas, built from scratch: each delta model on its
    attached modules only, in creation order, with the recorded values, unmerged."""
    model = copy.deepcopy(pristine(architecture))
    for record in records:
        if not record.attached:
            continue
        DELTA_CLASSES[record.kind](model, modified_modules=modified_modules(record))
        with torch.no_grad():
            for host in record.attached:
                for name, value in record.values[host].items():
                    model.get_parameter(name).copy_(value)
    return model


def modified_modules(record: Record) -> list[str]:
    """The entries that build `record`'s attached deltas (a parallel adapter's as pairs)."""
    copies = 2 if record.kind == "parallel_adapter" else 1
    return [host for host in record.attached for _ in range(copies)]


def in_scope(hosts, scope: str | None) -> list[str]:
    return [host for host in hosts if scope is None or host.startswith(scope + ".")]


class DeltaWalk(RuleBasedStateMachine):
    def __init__(self, architecture: str, directory: Path):
        super().__init__()
        self.architecture = architecture
        self.directory = Path(tempfile.mkdtemp(dir=directory))
        self.model = copy.deepcopy(pristine(architecture))
        self.records: list[Record] = []
        self.checkpoints: dict[str, tuple[Path, dict]] = {}
        self.saves = 0

    def record(self, kind: str) -> Record:
        return next(record for record in self.records if record.kind == kind)

    @initialize(order=st.permutations(KINDS), seed=st.integers(0, 2**16))
    def build(self, order, seed):
        for index, kind in enumerate(order):
            arguments = (
                {"modified_modules": PARALLEL_ADAPTER_MODULES} if kind == "parallel_adapter" else {}
            )
            delta_model = DELTA_CLASSES[kind](self.model, **arguments)
            delta_model.freeze_module()
            randomize(owned_parameters(delta_model), seed + index)
            record = Record(kind, delta_model, {})
            record.snapshot()
            self.records.append(record)

    def kinds(self, condition) -> list[str]:
        return [record.kind for record in self.records if condition(record)]

    @precondition(lambda self: self.kinds(lambda record: record.attached))
    @rule(data=st.data(), whole=st.booleans())
    def detach(self, data, whole):
        record = self.record(data.draw(st.sampled_from(self.kinds(lambda r: r.attached))))
        scope = None if whole else FIRST_LAYER[self.architecture]
        selected = in_scope(record.attached, scope)
        module = None if whole else self.model.get_submodule(scope)
        if not selected:
            with pytest.raises(RuntimeError, match="Nothing to detach"):
                record.delta_model.detach(module=module)
            return
        record.delta_model.detach(module=module)
        record.detached |= set(selected)
        record.merged -= set(selected)

    @precondition(lambda self: self.kinds(lambda record: record.detached))
    @rule(data=st.data(), whole=st.booleans())
    def attach(self, data, whole):
        record = self.record(data.draw(st.sampled_from(self.kinds(lambda r: r.detached))))
        scope = None if whole else FIRST_LAYER[self.architecture]
        selected = in_scope(record.detached, scope)
        module = None if whole else self.model.get_submodule(scope)
        if not selected:
            with pytest.raises(RuntimeError, match="Nothing to attach"):
                record.delta_model.attach(module=module)
            return
        record.delta_model.attach(module=module)
        record.detached -= set(selected)

    @precondition(lambda self: self.record("lora").attached)
    @rule(merge=st.booleans())
    def merge_or_unmerge(self, merge):
        record = self.record("lora")
        (record.delta_model.merge if merge else record.delta_model.unmerge)()
        record.merged = set(record.attached) if merge else set()

    @precondition(lambda self: self.kinds(lambda record: record.attached))
    @rule(data=st.data(), seed=st.integers(0, 2**16))
    def train(self, data, seed):
        """A training step's change to the attached, unmerged deltas of one delta model."""
        record = self.record(data.draw(st.sampled_from(self.kinds(lambda r: r.attached))))
        hosts = [host for host in record.attached if host not in record.merged]
        owned = owned_by_host(record.delta_model)
        randomize({name: p for host in hosts for name, p in owned[host].items()}, seed, std=0.05)
        for host in hosts:
            record.values[host] = {name: p.detach().clone() for name, p in owned[host].items()}

    @rule(kind=st.sampled_from(KINDS))
    def save(self, kind):
        record = self.record(kind)
        self.saves += 1
        path = self.directory / f"{self.saves}-{kind}"
        if record.detached:
            match = "every delta is detached" if not record.attached else "call attach"
            with pytest.raises(RuntimeError, match=match):
                record.delta_model.save_finetuned(path)
            assert not path.exists()
            return
        if record.merged:
            with pytest.raises(RuntimeError, match=r"call unmerge\(\)"):
                record.delta_model.save_finetuned(path)
            return
        record.delta_model.save_finetuned(path)
        values = {
            name: v for host_values in record.values.values() for name, v in host_values.items()
        }
        saved = load_file(path / WEIGHTS_NAME)
        assert saved.keys() == values.keys()
        assert all(torch.equal(saved[name], value) for name, value in values.items())
        self.checkpoints[kind] = (path, copy.deepcopy(record.values))

        # It reloads, alone on a fresh backbone, to the same deltas rebuilt from scratch.
        fresh = copy.deepcopy(pristine(self.architecture))
        AutoDeltaModel.from_finetuned(path, fresh)
        alone = Record(kind, record.delta_model, record.values)
        expected = output(rebuild(self.architecture, [alone]), self.architecture)
        torch.testing.assert_close(output(fresh, self.architecture), expected, **TOLERANCE)

    @precondition(lambda self: self.checkpoints)
    @rule(data=st.data(), replace=st.booleans())
    def load(self, data, replace):
        """Load the last checkpoint of a kind onto the walked backbone. With `replace`, the
        delta model of that kind is detached first and the loaded one takes its place (last in
        creation order); without, a BitFit checkpoint that trains the host's own biases is
        refused while any of its deltas is attached (a second would share them), and the others
        are not loaded (a second delta model of a kind stacks, tested in test_composition.py)."""
        kind = data.draw(st.sampled_from(sorted(self.checkpoints)))
        path, values = self.checkpoints[kind]
        record = self.record(kind)
        if replace and record.attached:
            record.delta_model.detach()
            record.detached |= set(record.attached)
            record.merged = set()
        trains_host_biases = any(
            attachment.delta.host_parameter_names for attachment in record.delta_model.attachments
        )
        if record.attached and trains_host_biases:
            with pytest.raises(ValueError, match=rf"already has a '{kind}' attribute"):
                AutoDeltaModel.from_finetuned(path, self.model)
            return
        if record.attached:
            return
        loaded = AutoDeltaModel.from_finetuned(path, self.model)
        self.records.remove(record)
        self.records.append(Record(kind, loaded, copy.deepcopy(values)))

    @invariant()
    def computes_what_the_rebuilt_model_computes(self):
        if not self.records:
            return
        expected = {
            name
            for record in self.records
            for host in record.attached
            for name in record.values[host]
        }
        assert delta_parameter_names(self.model) == expected
        reference = rebuild(self.architecture, self.records)
        torch.testing.assert_close(
            output(self.model, self.architecture),
            output(reference, self.architecture),
            **TOLERANCE,
        )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_random_walks_match_a_model_rebuilt_from_scratch(architecture, tmp_path):
    run_state_machine_as_test(lambda: DeltaWalk(architecture, tmp_path), settings=SETTINGS)
