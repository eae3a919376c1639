"""Fine-tuning defaults on small data: the schedule chosen without --epochs or --max-steps,
early stopping on an eval set, and --select choosing the checkpoint that becomes the application."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dharma_kernel.testing import cli_output as dharma
from dharma_kernel.testing import run_cli, tiny_foundation

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


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The 90-sentence task and a tiny foundation (fresh weights, a BPE trained on its texts)."""
    root = tmp_path_factory.mktemp("small")
    train, test = small_task(root / "data")
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    return tiny_foundation(root / "foundation", texts), train, test


def test_the_defaults_train_a_90_sentence_3_label_classifier_well_above_chance(capsys, task, tmp_path):
    foundation, train, test = task
    app = tmp_path / "classifier"
    printed = dharma(capsys, "finetune", foundation, "--head", "classification", "--data", train, "-o", app)
    # 90 records in batches of 16 are 6 steps an epoch: the 3 epochs that were the default
    # (18 steps) scored 0.63 on these held-out sentences; the default now runs 200 steps.
    assert "schedule: 200 steps of 16 records (33.3 epochs of 90), the default" in printed
    assert "application: " in printed and "(from step-00000200, the last checkpoint)" in printed
    scored = json.loads(dharma(capsys, "eval", app, "--data", test, "--json"))
    assert scored["records"] == 30 and scored["accuracy"] >= 0.8


# Scripted evaluations, one per eval step (0, 5, 10, ...): (accuracy, loss).
SCRIPT = [(0.3, 1.1), (0.5, 1.0), (0.9, 0.9), (0.9, 0.5), (0.8, 0.3), (0.9, 0.6), (0.7, 0.4), (0.6, 0.45),
          (0.5, 0.5)]  # fmt: skip


@pytest.fixture
def scripted(monkeypatch):
    """The head's evaluations replaced by SCRIPT, so which checkpoint wins is known in advance."""
    from dharma_kernel.train import finetune

    calls = iter(SCRIPT)

    def evaluate(*args, **kwargs) -> dict[str, float]:
        accuracy, loss = next(calls)
        return {"eval_loss": loss, "eval_records": 6.0, "eval_accuracy": accuracy}

    monkeypatch.setattr(finetune, "evaluate_head", evaluate)


@pytest.mark.parametrize(
    ("select", "chosen", "steps"),
    [
        # the best accuracy, ties to the lower loss (step 15); 3 evaluations without better: stop at 30
        (None, 15, 30),
        ("loss", 20, 35),  # the lowest loss, step 20; stop at 35
        ("last", 40, 40),  # no early stop: the last of --max-steps 40
    ],
)
def test_select_chooses_the_application_and_patience_stops_the_run(
    capsys, task, tmp_path, scripted, select, chosen, steps
):
    foundation, train, test = task
    app = tmp_path / "classifier"
    options = ["--select", select] if select else []
    printed = dharma(capsys, "finetune", foundation, "--head", "classification", "--data", train,
                     "--eval", test, "-o", app, "--max-steps", 40, "--eval-every", 5, "--patience", 3,
                     "--max-length", 32, *options)  # fmt: skip
    run = tmp_path / "classifier-run"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == steps
    assert (f"stopped early at step {steps}" in printed) == (steps < 40)
    assert f"(from step-{chosen:08d}," in printed
    # the application holds the weights of the checkpoint it names
    name = "heads.classification.out.weight"
    saved = load_file(str(run / "checkpoints" / f"step-{chosen:08d}" / "model.safetensors"))[name]
    assert torch.equal(load_file(str(app / "adapter.safetensors"))[name], saved)


def test_selecting_by_an_eval_score_without_an_eval_set_is_refused(capsys, task, tmp_path):
    foundation, train, _ = task
    code, _, err = run_cli(capsys, "finetune", foundation, "--head", "classification", "--data", train,
                           "-o", tmp_path / "app", "--select", "metric")  # fmt: skip
    assert code == 2
    assert "error: selecting the checkpoint by eval metric needs an eval set" in err
    assert "--eval FILE" in err and not (tmp_path / "app").exists()


def test_resuming_with_another_select_is_refused_and_the_run_is_left_as_it_was(capsys, task, tmp_path):
    foundation, train, test = task
    app = tmp_path / "app"
    base = ["finetune", foundation, "--head", "classification", "--data", train, "--eval", test, "-o", app,
            "--eval-every", 2, "--max-length", 32]  # fmt: skip
    dharma(capsys, *base, "--max-steps", 2, "--select", "loss")
    run = tmp_path / "app-run"

    def state():
        return sorted(p.name for p in (run / "checkpoints").iterdir()), (run / "metrics.jsonl").read_text()

    before = state()

    code, _, err = run_cli(capsys, *base, "--max-steps", 4, "--resume", "--select", "metric")
    assert code == 2
    assert f"error: {run} was started with --select loss; resuming it with --select metric" in err
    assert "Resume with --select loss" in err
    assert state() == before

    dharma(capsys, *base, "--max-steps", 4, "--resume", "--select", "loss")  # the run's own rule goes on
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == 4


def test_malformed_task_records_are_counted_and_skipped_or_stop_a_strict_run(capsys, caplog, task, tmp_path):
    foundation, train, test = task
    lines, held_out = train.read_text().splitlines(), len(test.read_text().splitlines())
    noisy = tmp_path / "noisy.jsonl"
    broken = ["{broken", json.dumps({"text": "no label here"})]  # records 2 and 3
    noisy.write_text("\n".join([lines[0], *broken, *lines[1:]]) + "\n")
    app = tmp_path / "app"
    printed = dharma(capsys, "finetune", foundation, "--head", "classification", "--data", noisy,
                     "--eval", test, "-o", app, "--max-steps", 2, "--max-length", 32)  # fmt: skip
    assert f"records: {len(lines) + 2 + held_out} read, {len(lines) + held_out} kept" in printed
    assert "dropped: 0 empty, 0 too_short, 0 duplicate, 2 malformed" in printed
    assert f"{noisy}:3: no 'label' field (classification records need text, label)" in caplog.text
    code, _, err = run_cli(capsys, "finetune", foundation, "--head", "classification", "--data", noisy,
                           "-o", tmp_path / "strict", "--max-steps", 2, "--strict")  # fmt: skip
    assert code == 2 and f"error: {noisy}:2: not JSON" in err and not (tmp_path / "strict").exists()

    code, out, err = run_cli(capsys, "eval", app, "--data", noisy, "--json")
    assert code == 0
    report = json.loads(out)["data"]
    assert (report["records_read"], report["records_kept"], report["dropped"]["malformed"]) == (
        len(lines) + 2, len(lines), 2)  # fmt: skip
    assert report["problems"][0].startswith(f"{noisy}:2: not JSON")
    assert f"{noisy}:3: no 'label' field" in report["problems"][1]
    assert f"{noisy}:2: not JSON" in err  # warned on stderr as dharma train warns
    code, _, err = run_cli(capsys, "eval", app, "--data", noisy, "--strict")
    assert code == 2 and f"error: {noisy}:2: not JSON" in err
