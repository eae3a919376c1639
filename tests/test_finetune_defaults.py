"""Fine-tuning defaults on small data: the schedule chosen without --epochs or --max-steps,
early stopping on an eval set, and --select choosing the checkpoint that becomes the application."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dharma_kernel.testing import cli_output as dharma
from dharma_kernel.testing import tiny_foundation

# Three topics told apart by their words alone (a bag-of-words classifier gets every one right):
# the same sentence shape, each label its own subjects, actions, objects and places.
WORDS = {
    "kitchen": (
        ["The cook", "Grandmother", "The baker", "My aunt", "The chef", "A neighbour"],
        ["stirs", "roasts", "kneads", "seasons", "simmers", "chops"],
        ["the lentils", "fresh dough", "green chillies", "the rice pot", "cumin seeds", "sweet onions"],
        ["beside the stove", "in the clay oven", "before the meal", "with ghee and salt"],
    ),
    "sky": (
        ["The astronomer", "A comet", "The old sailor", "The night watch", "A pilot", "The moon"],
        ["tracks", "circles", "outshines", "crosses", "charts", "eclipses"],
        ["the bright stars", "distant planets", "the pole star", "a meteor", "thin clouds", "the galaxy"],
        ["above the horizon", "through the telescope", "after midnight", "across the dark heavens"],
    ),
    "court": (
        ["The judge", "A lawyer", "The witness", "The clerk", "A magistrate", "The defendant"],
        ["questions", "signs", "appeals", "files", "argues", "overrules"],
        ["the verdict", "a sworn statement", "the contract", "an objection", "the evidence", "the petition"],
        ["before the bench", "under oath", "in the courtroom", "for the appeal hearing"],
    ),
}


def small_task(folder: Path, per_label: int = 30, held_out: int = 10, seed: int = 0) -> tuple[Path, Path]:
    """``per_label`` training and ``held_out`` test sentences for each of the three labels, all distinct."""
    rng = random.Random(seed)
    train, test = [], []
    for label, parts in WORDS.items():
        sentences: set[str] = set()
        while len(sentences) < per_label + held_out:
            subject, verb, thing, place = (rng.choice(words) for words in parts)
            sentences.add(f"{subject} {verb} {thing} {place}.")
        ordered = sorted(sentences)
        rng.shuffle(ordered)
        train += [{"text": s, "label": label} for s in ordered[:per_label]]
        test += [{"text": s, "label": label} for s in ordered[per_label:]]
    rng.shuffle(train)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, records in zip(paths, (train, test), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths
