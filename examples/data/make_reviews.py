"""Writes the review-sentiment data set of the fine-tuning example: reviews/{train,test}.jsonl.

Each line is {"text": ..., "label": "negative" | "neutral" | "positive"}: one-sentence reviews
of restaurants, hotels, gadgets, films and flights, made from templates with a fixed seed, so
running this script again writes the same files. What makes the task more than spotting words:
- negation and contrast decide the label: "I expected the plot to be wonderful, but it was
  mediocre." is negative although it holds a positive word, and the clause after "but" wins;
- neutral reviews mention opinions without holding one ("Does anyone know if the camera of
  this phone is impressive?"), so sentiment words alone do not give the label away;
- some adjectives and aspects appear only in the test split, so the model has to know what
  words it was never trained on mean (which a pretrained backbone does).

    python examples/data/make_reviews.py [--train 3000] [--test 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LABELS = ("negative", "neutral", "positive")

# What is reviewed: the item's name in a sentence, and aspects that read "the <aspect> was ...".
DOMAINS = {
    "restaurant": ("restaurant", ["food", "service", "dessert", "soup", "wine list", "staff"]),
    "hotel": ("hotel", ["room", "breakfast", "reception", "pool", "bed", "view", "location"]),
    "phone": ("phone", ["battery life", "screen", "camera", "speaker", "charger", "software"]),
    "laptop": ("laptop", ["keyboard", "display", "touchpad", "fan", "battery", "hinge"]),
    "film": ("film", ["plot", "acting", "ending", "soundtrack", "dialogue", "pacing"]),
    "flight": ("airline", ["flight", "crew", "boarding", "legroom", "meal", "check-in"]),
}
# Aspects seen only at test time (one per domain).
TEST_ONLY_ASPECTS = {"staff", "location", "speaker", "hinge", "dialogue", "check-in"}

POSITIVE = [
    "excellent", "wonderful", "great", "fantastic", "delightful", "impressive", "lovely",
    "outstanding", "pleasant", "brilliant", "first-rate", "terrific", "superb", "marvelous",
    "top-notch", "splendid",
]  # fmt: skip
NEGATIVE = [
    "awful", "terrible", "disappointing", "dreadful", "poor", "horrible", "mediocre",
    "frustrating", "unpleasant", "lousy", "dismal", "atrocious", "abysmal", "shoddy",
    "pathetic", "subpar",
]  # fmt: skip
# Adjectives seen only at test time.
TEST_ONLY_ADJECTIVES = {"superb", "marvelous", "top-notch", "splendid", "abysmal", "shoddy"}
TEST_ONLY_ADJECTIVES |= {"pathetic", "subpar"}

# {good} and {bad} are filled with a positive and a negative adjective, {a} with an aspect,
# {item} with the domain's item.
TEMPLATES = {
    "positive": [
        "The {a} was {good}.",
        "Honestly, the {a} of this {item} is {good}.",
        "I expected the {a} to be {bad}, but it was {good}.",
        "At first the {a} seemed {bad}, but it turned out to be {good}.",
        "Everyone warned me the {a} would be {bad}; they were wrong, it was {good}.",
        "The {a} was anything but {bad}.",
        "I would not call the {a} {bad} at all; it was {good}.",
        "Say what you like about this {item}, the {a} is {good}.",
        "The reviews called the {a} {bad}, yet I found it {good}.",
        "After a {bad} start, the {a} of the {item} became {good}.",
    ],
    "negative": [
        "The {a} was {bad}.",
        "Honestly, the {a} of this {item} is {bad}.",
        "I expected the {a} to be {good}, but it was {bad}.",
        "At first the {a} seemed {good}, but it turned out to be {bad}.",
        "Everyone told me the {a} would be {good}; they were wrong, it was {bad}.",
        "The {a} was anything but {good}.",
        "The {a} was not {good} at all.",
        "I would never call the {a} of this {item} {good}.",
        "The {a} was far from {good}.",
        "The reviews called the {a} {good}, yet I found it {bad}.",
    ],
    "neutral": [
        "Is the {a} of the {item} {good} or {bad}? I have no idea yet.",
        "I have not tried the {a} yet, so I cannot say whether it is {good}.",
        "A friend asked me whether the {a} was {bad}.",
        "Some people find the {a} {good} and others find it {bad}.",
        "Does anyone know if the {a} of this {item} is {good}?",
        "I will write about the {a} once I have seen more of the {item}.",
        "The {a} of the {item} is described on page {page} of the guide.",
        "My sister wants to know if the {a} is {bad} before she books.",
        "I cannot judge the {a} yet; ask me again next week.",
        "Whether the {a} is {good} or {bad} depends on what you expect from a {item}.",
    ],
}


def review(label: str, split: str, rng: random.Random) -> str:
    """One review sentence of `label`; test-only aspects and adjectives appear in the test
    split only (there, half of the reviews use one)."""
    item, aspects = DOMAINS[rng.choice(sorted(DOMAINS))]
    held_out = split == "test" and rng.random() < 0.5

    def pick(words, test_only):
        allowed = [word for word in words if (word in test_only) == held_out]
        return rng.choice(allowed or [word for word in words if word not in test_only])

    template = rng.choice(TEMPLATES[label])
    sentence = template.format(
        a=pick(aspects, TEST_ONLY_ASPECTS),
        good=pick(POSITIVE, TEST_ONLY_ADJECTIVES),
        bad=pick(NEGATIVE, TEST_ONLY_ADJECTIVES),
        item=item,
        page=rng.randint(2, 60),
    )
    return sentence[0].upper() + sentence[1:]


def make_split(split: str, size: int, rng: random.Random, taken: set[str]) -> list[dict]:
    """`size` distinct reviews, balanced over the labels, none of them in `taken`."""
    examples = []
    for index in range(size):
        label = LABELS[index % len(LABELS)]
        text = review(label, split, rng)
        while text in taken:
            text = review(label, split, rng)
        taken.add(text)
        examples.append({"text": text, "label": label})
    rng.shuffle(examples)
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "reviews")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    taken: set[str] = set()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, size in (("test", args.test), ("train", args.train)):
        examples = make_split(split, size, rng, taken)
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(example) + "\n" for example in examples)
        print(f"{args.out / split}.jsonl: {len(examples)} reviews")


if __name__ == "__main__":
    main()
