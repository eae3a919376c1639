"""Writes train.jsonl and test.jsonl: questions over short passages about teachers and students.

Every passage is three facts in a shuffled order, each told in one of two sentence shapes,
plus sometimes a sentence that answers nothing. A question names one fact's other parts and
asks for the remaining one, so a model has to find the fact and read the answer off its cue
words ("at", "for", "banks of"). The test passages draw their people, places and texts from
the same lists but in combinations no training passage has, and a quarter of each list is
kept for the test set only. Deterministic: run it again and the files come out the same.

    python examples/data/qa/generate.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TEACHERS = ["Vasiṣṭha", "Viśvāmitra", "Sāndīpani", "Droṇa", "Yājñavalkya", "Gārgī", "Maitreyī",
            "Agastya", "Bharadvāja", "Atri", "Kapila", "Patañjali", "Vālmīki", "Vyāsa", "Nārada",
            "Aruṇi"]  # fmt: skip
STUDENTS = ["Rāma", "Lakṣmaṇa", "Balarāma", "Arjuna", "Karṇa", "Naciketas", "Śvetaketu",
            "Satyakāma", "Dhruva", "Prahlāda", "Ekalavya", "Bhīṣma", "Sudāmā", "Janaka", "Upamanyu",
            "Āruṇi"]  # fmt: skip
PLACES = ["Naimiṣāraṇya", "Ayodhyā", "Ujjayinī", "Hastināpura", "Mithilā", "Kāśī", "Prayāga",
          "Citrakūṭa", "Dvārakā", "Takṣaśilā", "Badarī", "Puṣkara", "Gayā", "Kāñcī", "the forest hermitage",
          "the river ashram"]  # fmt: skip
TEXTS = ["Upaniṣads", "Vedas", "Yoga Sūtras", "Bhagavad Gītā", "Rāmāyaṇa", "Brahma Sūtras", "Nyāya Sūtras",
         "Sāṃkhya Kārikā", "hymns of the Ṛgveda", "grammar of Pāṇini", "science of the stars",
         "art of healing"]  # fmt: skip
DURATIONS = ["twelve years", "seven years", "three seasons", "one winter", "forty days",
             "nine months", "two years", "a full year", "many summers", "five years", "eighteen days",
             "one monsoon"]  # fmt: skip
PRACTICES = ["prāṇāyāma", "japa", "silent meditation", "the chanting of hymns", "fasting",
             "seva in the kitchen", "archery", "the recitation of verses", "walking meditation",
             "fire offerings", "yoga postures", "debate"]  # fmt: skip
SEASONS = ["monsoon", "winter", "spring", "summer", "autumn", "harvest", "cool season", "dry season"]
RIVERS = ["Gaṅgā", "Yamunā", "Sarasvatī", "Godāvarī", "Narmadā", "Kāverī", "Sindhu", "Sarayū", "Gomatī",
          "Tuṅgabhadrā", "Kṣiprā", "Mahānadī"]  # fmt: skip
FILLERS = [
    "The hermitage was quiet before dawn.",
    "Lamps were lit at dusk and the day's verses were said once more.",
    "Visitors came from far villages to listen.",
    "Nobody there owned more than a bowl and a cloth.",
    "The cows grazed near the gate while the lessons went on.",
]

# Each fact: two sentence shapes, and questions as (question, slot the answer is in).
FACTS = {
    "taught": (
        ["{teacher} taught {student} at {place}.", "At {place}, {teacher} taught {student}."],
        [("Who taught {student}?", "teacher"), ("Whom did {teacher} teach?", "student"),
         ("Where did {teacher} teach {student}?", "place")],
    ),
    "studied": (
        ["{student} studied the {text} for {duration}.", "For {duration}, {student} studied the {text}."],
        [("What did {student} study?", "text"), ("How long did {student} study the {text}?", "duration")],
    ),
    "practised": (
        ["Every {season} the students practised {practice} on the banks of the {river}.",
         "On the banks of the {river} the students practised {practice} every {season}."],
        [("What did the students practise every {season}?", "practice"),
         ("Beside which river did the students practise {practice}?", "river"),
         ("In which season did the students practise {practice}?", "season")],
    ),
}  # fmt: skip
POOLS = {"teacher": TEACHERS, "student": STUDENTS, "place": PLACES, "text": TEXTS, "duration": DURATIONS,
         "practice": PRACTICES, "season": SEASONS, "river": RIVERS}  # fmt: skip


def split_pools() -> tuple[dict, dict]:
    """Training draws from the first three quarters of each list; the test set from all of it."""
    train = {slot: values[: len(values) * 3 // 4] for slot, values in POOLS.items()}
    return train, POOLS


def passage(rng: random.Random, pool: dict) -> tuple[str, dict, dict]:
    """The context, the slot values, and where (fact, slot) -> character start of each value."""
    values = {slot: rng.choice(options) for slot, options in pool.items()}
    parts = [(fact, rng.choice(shapes)) for fact, (shapes, _) in FACTS.items()]
    rng.shuffle(parts)
    if rng.random() < 0.5:
        parts.insert(rng.randrange(len(parts) + 1), (None, rng.choice(FILLERS)))
    context, starts = "", {}
    for fact, shape in parts:
        if context:
            context += " "
        sentence = shape.format(**values)
        for slot in values:
            marker = "{" + slot + "}"
            if fact is not None and marker in shape:
                offset = shape.format(**{**values, slot: "\0"}).index("\0")
                starts[(fact, slot)] = len(context) + offset
        context += sentence
    return context, values, starts


def records(rng: random.Random, pool: dict, passages: int, seen: set[str], test: bool) -> list[dict]:
    """Three questions on each of ``passages`` passages; ``seen`` holds the training combinations."""
    out: list[dict] = []
    questions = [(fact, q) for fact, (_, qs) in FACTS.items() for q in qs]
    while len(out) < passages * 3:
        context, values, starts = passage(rng, pool)
        key = "|".join(values[s] for s in ("teacher", "student", "place", "text"))
        if test and key in seen:
            continue  # a test passage never repeats a training combination
        seen.add(key)
        for fact, (question, slot) in rng.sample(questions, 3):
            text, start = values[slot], starts[(fact, slot)]
            assert context[start : start + len(text)] == text
            out.append({"question": question.format(**values), "context": context,
                        "answer": {"text": text, "start": start}})  # fmt: skip
    return out


def main() -> None:
    folder = Path(__file__).resolve().parent
    train_pool, test_pool = split_pools()
    rng = random.Random(20261126)
    seen: set[str] = set()
    train = records(rng, train_pool, 200, seen, test=False)
    test = records(rng, test_pool, 30, seen, test=True)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (folder / name).write_text(text, encoding="utf-8")
        print(f"{folder / name}: {len(rows)} records")


if __name__ == "__main__":
    main()
