"""QA end to end: a tiny foundation fine-tuned with the QA head, evaluated on people it never saw,
saved as an application, reloaded, and asked through `dharma predict`."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from trainkit import write_manifest
from typer.testing import CliRunner

from dharma_kernel.cli import app
from dharma_kernel.testing import run_cli

# Names are made of random syllables, new in every record, so no name is an answer twice and
# the held-out names are unseen: the head must learn where an answer sits relative to the cue
# words ("taught", "at"), not which names are answers.
SYLLABLES = ["va", "shi", "dra", "ka", "pi", "la", "ru", "ma", "na", "ga", "ya", "su", "de", "vi", "to", "ha"]
SHAPES = ["{teacher} taught {student} at {place}.", "At {place}, {teacher} taught {student}."]
QUESTIONS = [
    ("Who taught {student}?", "teacher"),
    ("Whom did {teacher} teach?", "student"),
    ("Where did {teacher} teach {student}?", "place"),
]


def qa_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        values = {
            slot: "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
            for slot in ("teacher", "student", "place")
        }
        names = list(values.values())
        if any(a in b for a in names for b in names if a is not b):
            continue  # each answer must occur once in its context
        context = rng.choice(SHAPES).format(**values)
        question, slot = rng.choice(QUESTIONS)
        out.append(
            {"question": question.format(**values), "context": context, "answer": {"text": values[slot]}}
        )
    return out


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def invoke(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, f"{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def qa_app(tmp_path_factory) -> Path:
    """A foundation trained 4 steps on trainkit's text (no modules: this tests the head), fine-tuned
    60 steps with the QA head on 320 records and evaluated on 45 with unseen names."""
    root = tmp_path_factory.mktemp("qa")
    invoke("train", str(write_manifest(root, modules=False, train={"max_steps": 4, "eval_every": 4})))
    write_jsonl(root / "train.jsonl", qa_records(320, seed=0))
    write_jsonl(root / "test.jsonl", qa_records(45, seed=1))
    output = invoke(
        "finetune", str(root / "run"), "--head", "qa", "--data", str(root / "train.jsonl"),
        "--eval", str(root / "test.jsonl"), "-o", str(root / "app"), "--max-steps", "60",
        "--batch-size", "16", "--learning-rate", "1e-2", "--max-length", "64", "--eval-every", "30",
    )  # fmt: skip
    root.joinpath("finetune.txt").write_text(output)
    return root


def reported(root: Path, metric: str) -> tuple[float, int, float]:
    """The best value of ``metric`` that `dharma finetune` printed, its step and the value at step 0."""
    text = root.joinpath("finetune.txt").read_text()
    match = re.search(rf"eval_{metric} ([\d.]+) at step (\d+) \(at the start: ([\d.]+)\)", text)
    assert match, text
    return float(match[1]), int(match[2]), float(match[3])


def test_finetuning_lifts_held_out_exact_match_and_f1_well_above_the_untrained_head(qa_app):
    em, _, em_before = reported(qa_app, "exact_match")
    f1, _, f1_before = reported(qa_app, "f1")
    # Measured (2 CPU threads, deterministic): exact match 0.022 -> 0.511, F1 0.102 -> 0.673 on names
    # never trained on. The untrained head is near chance: a name of a few tokens among about 25.
    assert em_before < 0.1 and f1_before < 0.2, (em_before, f1_before)
    assert em > 0.35 and f1 > 0.5, (em, f1)


def test_the_saved_application_evaluates_and_predicts_as_the_trained_model_did(qa_app):
    import torch

    from dharma_kernel.application import load_application

    scores = json.loads(invoke("eval", str(qa_app / "app"), "--data", str(qa_app / "test.jsonl"), "--json"))
    em, step, _ = reported(qa_app, "exact_match")
    f1, _, _ = reported(qa_app, "f1")
    # the application holds the best checkpoint's weights: the same scores, recomputed after a reload
    assert scores["exact_match"] == pytest.approx(em, abs=1e-4) and scores["f1"] == pytest.approx(
        f1, abs=1e-4
    )
    assert scores["records"] == 45

    record = json.loads((qa_app / "test.jsonl").read_text().splitlines()[0])
    printed = json.loads(
        invoke(
            "predict",
            str(qa_app / "app"),
            "--question",
            record["question"],
            "--context",
            record["context"],
            "--json",
        )  # fmt: skip
    )
    model, tokenizer = load_application(qa_app / "app")
    model.eval()
    with torch.no_grad():
        again = model.heads["qa"].predict(
            model, tokenizer, [{k: record[k] for k in ("question", "context")}]
        )[0]
    assert printed == again
    assert record["context"][printed["start"] : printed["end"]] == printed["answer"]
    assert 0 < printed["score"] <= 1
    text = invoke(
        "predict", str(qa_app / "app"), "--question", record["question"], "--context", record["context"]
    )
    assert text.splitlines()[0] == printed["answer"]
    assert f"chars {printed['start']}..{printed['end']}" in text


def dharma_error(capsys, *argv: str) -> str:
    """The one-line error ``dharma`` prints for argv (it must exit with code 2)."""
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    return " ".join(err.split())


def test_bad_qa_data_names_the_file_and_record(qa_app, capsys):
    context = "Vasishtha taught Rama."
    bad = write_jsonl(
        qa_app / "bad.jsonl",
        [
            {"question": "Who taught Rama?", "context": context, "answer": {"text": "Vasishtha"}},
            {"question": "Who taught Rama?", "context": context, "answer": {"text": "Drona"}},
            {"question": "Whom?", "context": context, "answer": {"text": "Rama", "start": 3}},
        ],
    )
    error = dharma_error(capsys, "eval", qa_app / "app", "--data", bad)
    assert f"error: {bad}: record 2: the answer 'Drona' is not in its context" in error
    bad.write_text("\n".join(bad.read_text().splitlines()[::2]) + "\n")  # records 1 and 3
    error = dharma_error(capsys, "eval", qa_app / "app", "--data", bad)
    assert f"{bad}: record 2: the answer 'Rama' is not inside its context at start 3" in error
    error = dharma_error(
        capsys, "predict", qa_app / "app", "--question", "Who taught Rama?", "--context", " "
    )
    assert "'context' is empty" in error


def test_predict_names_the_inputs_a_record_lacks(qa_app, capsys):
    error = dharma_error(capsys, "predict", qa_app / "app", "--question", "Who taught Rama?")
    assert "the qa head needs context" in error
