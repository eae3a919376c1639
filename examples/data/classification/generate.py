"""Writes train.jsonl and test.jsonl: which of four paths (karma, bhakti, jnana, dhyana) a sentence is about.

Sentences are built from templates written for this project: a subject, a practice phrase of
one path and a closing clause. Test sentences use practices, subjects and closings that never
occur in training, so a model must recognise the path from its words, not memorise sentences.

    python examples/data/classification/generate.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Per path: practices for training, then practices only the test set uses. A test practice
# shares words with the training ones (work, devotion, meditation, self) in a new sentence.
PRACTICES = {
    "karma": (
        [
            "does her duty without asking for reward",
            "works in the fields and offers the harvest to others",
            "acts rightly and lets go of the fruit of action",
            "serves the sick without expecting thanks",
            "performs every task as an offering",
            "keeps working for the good of the village",
            "acts without attachment to success or failure",
        ],
        [
            "does the work in front of him and asks for no reward",
            "serves others and offers every action",
            "keeps to her duty whatever the fruit",
        ],
    ),
    "bhakti": (
        [
            "sings the names of the Lord with love",
            "offers flowers at the shrine with devotion",
            "prays with a full heart to Krishna",
            "surrenders every worry to the divine beloved",
            "chants hymns of praise until dawn",
            "gives her heart completely to God",
            "bows before the Lord in humble worship",
        ],
        [
            "sings hymns to the divine with devotion",
            "prays to the Lord with love and surrender",
            "offers her heart in worship at the shrine",
        ],
    ),
    "jnana": (
        [
            "asks who am I and inquires into the self",
            "studies the Upanishads to know Brahman",
            "discriminates between the real and the unreal",
            "reflects on the teaching that the self is not the body",
            "questions every belief to find the truth",
            "seeks knowledge of the eternal witness",
            "examines the mind to see what knows it",
        ],
        [
            "inquires into the truth of the self",
            "studies the teaching to know what is real",
            "seeks knowledge and questions who knows",
        ],
    ),
    "dhyana": (
        [
            "sits in silent meditation watching the breath",
            "closes her eyes and rests the mind on one point",
            "practises concentration in the quiet of the cave",
            "meditates each morning with a straight spine",
            "lets thoughts settle until the mind is still",
            "fixes attention on the flame of a lamp",
            "withdraws the senses and sits motionless",
        ],
        [
            "sits still and watches each breath in meditation",
            "rests attention on the breath until the mind is quiet",
            "closes his eyes in silent concentration",
        ],
    ),
}

TRAIN_SUBJECTS = [
    "The farmer",
    "A young student",
    "The old woman",
    "My teacher",
    "The merchant",
    "A mother",
    "The monk",
    "Every morning the priest",
    "The weaver",
    "A soldier",
]
TEST_SUBJECTS = ["The potter", "A grandfather", "The fisherman", "Her brother", "The king"]
TRAIN_CLOSINGS = [
    "",
    " and finds peace",
    " day after day",
    " in the village",
    " as the sun rises",
    " before the evening meal",
]
TEST_CLOSINGS = ["", " through the long winter", " beside the river"]


def sentences(
    part: int, subjects: list[str], closings: list[str], per_label: int, rng: random.Random
) -> list[dict]:
    rows = []
    for label, both in PRACTICES.items():
        practices = both[part]
        combos = [(s, p, c) for s in subjects for p in practices for c in closings]
        for subject, practice, closing in rng.sample(combos, per_label):
            rows.append({"text": f"{subject} {practice}{closing}.", "label": label})
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(108)
    here = Path(__file__).parent
    for part, (name, subjects, closings, count) in enumerate(
        (("train", TRAIN_SUBJECTS, TRAIN_CLOSINGS, 100), ("test", TEST_SUBJECTS, TEST_CLOSINGS, 30))
    ):
        rows = sentences(part, subjects, closings, count, rng)
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
