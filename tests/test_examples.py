"""The examples: the review data set is what its script writes, and the main job (finetune.py)
runs end to end (train, save, reload onto a fresh backbone, same predictions) on a tiny BERT
with a tokenizer made from the data's words, so CI needs neither the pretrained backbone's
package nor minutes."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from rich.console import Console
from tiny_models import tiny_model

EXAMPLES = Path(__file__).parent.parent / "examples"
DATA = EXAMPLES / "data"
LABELS = ("negative", "neutral", "positive")


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_split(directory: Path, split: str) -> list[dict]:
    lines = (directory / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_the_data_set_is_what_its_script_writes(tmp_path, monkeypatch):
    make_reviews = load_script(DATA / "make_reviews.py")
    monkeypatch.setattr(sys, "argv", ["make_reviews.py", "--out", str(tmp_path)])
    make_reviews.main()
    for split in ("train", "test"):
        written = (tmp_path / f"{split}.jsonl").read_bytes()
        assert written == (DATA / "reviews" / f"{split}.jsonl").read_bytes(), split


def test_the_splits_are_balanced_and_disjoint():
    train, test = read_split(DATA / "reviews", "train"), read_split(DATA / "reviews", "test")
    assert (len(train), len(test)) == (3000, 600)
    for split in (train, test):
        counts = {label: sum(e["label"] == label for e in split) for label in LABELS}
        assert counts == dict.fromkeys(LABELS, len(split) // 3)
    assert not {e["text"] for e in train} & {e["text"] for e in test}


@pytest.fixture
def tiny_backbone(tmp_path) -> Path:
    """A directory with a tiny BERT and a WordPiece tokenizer over the data's words."""
    texts = [e["text"] for split in ("train", "test") for e in read_split(DATA / "reviews", split)]
    words = sorted(
        {word for text in texts for word in re.findall(r"[a-z]+|[^a-z\s]", text.lower())}
    )
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    model = tiny_model("bert", vocab_size=len(vocabulary))
    backbone = tmp_path / "backbone"
    model.save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    return backbone


@pytest.mark.parametrize("delta", ["lora", "adapter", "bitfit"])
def test_the_main_job_runs_end_to_end(tiny_backbone, tmp_path, monkeypatch, capsys, delta):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what the script sets, undone afterwards
    verbosity = transformers.logging.get_verbosity()
    finetune = load_script(EXAMPLES / "finetune.py")
    output_dir = tmp_path / "checkpoint"
    arguments = ["--backbone", str(tiny_backbone), "--delta", delta, "--max-steps", "4"]
    arguments += ["--batch-size", "16", "--output-dir", str(output_dir), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["finetune.py", *arguments])
    try:
        finetune.main()  # raises SystemExit if the reloaded model does not score the same
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()

    printed = capsys.readouterr().out
    assert "reloaded from checkpoint" in printed
    assert "4 of batch 16" in printed
    assert (output_dir / "delta.safetensors").is_file()
    assert json.loads((output_dir / "config.json").read_text())["delta_type"] == delta
    # Read from a file (capsys is not a terminal): plain progress, the thread count, whole lines.
    assert re.search(r"epoch 1/3: step 4/4, loss \d+\.\d{4}, [\d.]+ steps/s", printed)
    assert re.search(r"torch threads\W+\d+", printed)
    assert "(delta)" in printed or delta == "bitfit"  # parameter states as tags, not colour
    assert "\x1b[" not in printed


def test_the_main_job_against_peft_times_both_on_the_same_batches(tiny_backbone, monkeypatch):
    """benchmarks/main_job.py: fastdelta's and PEFT's LoRA runs of the job, alternating."""
    from benchmarks import main_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    verbosity = transformers.logging.get_verbosity()
    arguments = ["--backbone", str(tiny_backbone), "--steps", "2", "--chunk", "1"]
    try:
        result = main_job.main([*arguments, "--batch-size", "8"])
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    assert result["fastdelta_steps_per_second"] > 0 and result["peft_steps_per_second"] > 0
    ratio = result["fastdelta_steps_per_second"] / result["peft_steps_per_second"]
    assert result["ratio"] == pytest.approx(ratio)
    assert 0 < result["fastdelta_loss"] < 2 and 0 < result["peft_loss"] < 2


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_come_every_few_seconds_or_steps_and_at_the_end():
    finetune = load_script(EXAMPLES / "finetune.py")
    clock, lines = FakeClock(), []
    progress = finetune.ProgressLines(120, lines.append, seconds=10.0, steps=50, clock=clock)
    for step in range(1, 121):
        clock.now = step * 0.5 if step <= 40 else 20 + (step - 40) * 0.01  # then much faster
        progress.advance("epoch 1/1", loss=1.0 / step)
    # Every 20 steps while 0.5 s each (10 s), every 50 steps when fast, and the last step.
    assert [line.split(",")[0] for line in lines] == [
        "epoch 1/1: step 20/120",
        "epoch 1/1: step 40/120",
        "epoch 1/1: step 90/120",
        "epoch 1/1: step 120/120",
    ]
    assert lines[0] == "epoch 1/1: step 20/120, loss 0.0500, 2.00 steps/s, 50 s left"


def test_progress_display_is_plain_lines_off_a_terminal():
    finetune = load_script(EXAMPLES / "finetune.py")
    file = io.StringIO()
    console = Console(file=file)
    with finetune.progress_display(console, 2) as advance:
        advance("epoch 1/1", 0.5)
        advance("epoch 1/1", 0.25)
    assert re.fullmatch(
        r"epoch 1/1: step 2/2, loss 0\.2500, [\d.]+ steps/s, 0 s left\n", file.getvalue()
    )


HEAVY = ("torch", "transformers", "fastdelta")
HELP_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("finetune", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.argv = ["finetune.py", "--help"]
try:
    module.main()
except SystemExit:
    pass
print("imported:", [name for name in {heavy} if name in sys.modules])
"""


def test_help_answers_before_torch_is_imported(tmp_path):
    script = HELP_SCRIPT.format(heavy=HEAVY)
    completed = subprocess.run(
        [sys.executable, "-c", script, str(EXAMPLES / "finetune.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert "--max-steps" in completed.stdout
    assert "imported: []" in completed.stdout
