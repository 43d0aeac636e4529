"""fastdelta quick start: LoRA on a small BERT classifier, end to end, offline.

The backbone is a BERT built from a config (random weights; a real pretrained model works the
same way), the task a synthetic one: does the sequence contain the "keyword" token? The
backbone stays frozen; only the LoRA deltas and the fresh classifier head train.

    python examples/quickstart.py [--steps 150] [--delta lora|adapter|parallel_adapter|bitfit]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from transformers import BertConfig, BertForSequenceClassification

from fastdelta import AutoDeltaModel, Visualization

VOCAB, LENGTH, KEYWORD = 64, 16, 7
console = Console()


def make_batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [size, LENGTH] and labels [size]: 1 when KEYWORD occurs in the sequence."""
    input_ids = torch.randint(KEYWORD + 1, VOCAB, (size, LENGTH), generator=generator)
    labels = torch.randint(0, 2, (size,), generator=generator)
    positions = torch.randint(0, LENGTH, (size,), generator=generator)
    input_ids[labels == 1, positions[labels == 1]] = KEYWORD
    return input_ids, labels


@torch.no_grad()
def accuracy(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    input_ids, labels = batch
    predictions = model(input_ids=input_ids).logits.argmax(-1)
    return (predictions == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--delta", default="lora", choices=["lora", "adapter", "parallel_adapter", "bitfit"]
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    console.rule("The backbone")
    Visualization(model).structure_graph()

    # The OpenDelta API: name the modules (here by common-structure names) and add deltas.
    delta_config = {"delta_type": args.delta}
    if args.delta == "lora":
        delta_config.update(modified_modules=["attn@.q@", "attn@.v@", "ff@.w1@"], lora_r=8)
    delta_model = AutoDeltaModel.from_config(delta_config, backbone_model=model)
    delta_model.freeze_module(set_state_dict=True)
    console.rule(f"After adding {args.delta} deltas and freezing the backbone")
    delta_model.log()

    test_batch = make_batch(512, generator)
    before = accuracy(model, test_batch)
    optimizer = torch.optim.AdamW(delta_model.trainable_parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        input_ids, labels = make_batch(64, generator)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0:
            console.print(f"step {step:4d}  loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    after = accuracy(model, test_batch)

    # detach() gives back the original backbone; attach() brings the trained deltas back.
    delta_model.detach()
    detached = accuracy(model, test_batch)
    delta_model.attach()
    reattached = accuracy(model, test_batch)

    console.rule("Summary")
    total = delta_model.num_total_parameters()
    trainable = delta_model.num_trainable_parameters()
    console.print(
        f"accuracy before training {before:.3f}, after {after:.3f} "
        f"(detached {detached:.3f}, re-attached {reattached:.3f})"
    )
    console.print(
        f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
    )
    backends = ", ".join(sorted(delta_model.backends()))
    console.print(
        f"{args.steps / seconds:.1f} steps/s on the {backends} backend with "
        f"{torch.get_num_threads()} torch threads; "
        f"state_dict keeps {len(model.state_dict())} trainable tensors"
    )
    if reattached != after:
        raise SystemExit("re-attaching the deltas did not restore the trained model")


if __name__ == "__main__":
    main()
