"""Writes train.jsonl and test.jsonl: which of four paths (karma, bhakti, jnana, dhyana) a sentence is about.

Sentences are built from templates written for this project: a subject, a practice phrase of
one path and a closing clause. Test sentences use subjects and closings that never occur in
training, so a model must recognise the practice, not memorise sentences.

    python examples/data/classification/generate.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PRACTICES = {
    "karma": [
        "does her duty without asking for reward",
        "works in the fields and offers the harvest to others",
        "acts rightly and lets go of the fruit of action",
        "serves the sick without expecting thanks",
        "performs every task as an offering",
        "keeps working for the good of the village",
        "does the work that falls to him with full care",
        "acts without attachment to success or failure",
        "carries water for the elders each morning",
        "finishes the labour of the day without complaint",
    ],
    "bhakti": [
        "sings the names of the Lord with love",
        "offers flowers at the shrine with devotion",
        "prays with a full heart to Krishna",
        "surrenders every worry to the divine beloved",
        "chants hymns of praise until dawn",
        "weeps with love before the image of the goddess",
        "repeats the holy name with deep devotion",
        "gives her heart completely to God",
        "dances in the temple out of love for the divine",
        "bows before the Lord in humble worship",
    ],
    "jnana": [
        "asks who am I and inquires into the self",
        "studies the Upanishads to know Brahman",
        "discriminates between the real and the unreal",
        "reflects on the teaching that the self is not the body",
        "questions every belief to find the truth",
        "listens to the teacher and contemplates the meaning of the scriptures",
        "seeks knowledge of the eternal witness",
        "reasons carefully about what never changes",
        "examines the mind to see what knows it",
        "reads the commentaries and debates their meaning",
    ],
    "dhyana": [
        "sits in silent meditation watching the breath",
        "closes her eyes and rests the mind on one point",
        "practises concentration in the quiet of the cave",
        "meditates each morning with a straight spine",
        "lets thoughts settle until the mind is still",
        "fixes attention on the flame of a lamp",
        "counts slow breaths in deep stillness",
        "withdraws the senses and sits motionless",
        "holds the mind steady in long meditation",
        "sits cross-legged and observes the breath",
    ],
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


def sentences(subjects: list[str], closings: list[str], per_label: int, rng: random.Random) -> list[dict]:
    rows = []
    for label, practices in PRACTICES.items():
        combos = [(s, p, c) for s in subjects for p in practices for c in closings]
        for subject, practice, closing in rng.sample(combos, per_label):
            rows.append({"text": f"{subject} {practice}{closing}.", "label": label})
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(108)
    here = Path(__file__).parent
    for name, subjects, closings, count in (
        ("train", TRAIN_SUBJECTS, TRAIN_CLOSINGS, 100),
        ("test", TEST_SUBJECTS, TEST_CLOSINGS, 30),
    ):
        rows = sentences(subjects, closings, count, rng)
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
