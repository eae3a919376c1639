"""Faults in training runs: divergence, damaged run directories, concurrent writers, kills and a
full disk while a checkpoint is written. Each ends in one clear error (or a warning and a
recovery), and what was saved before survives."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from trainkit import weights, write_manifest

from dharma_kernel.errors import DharmaError
from dharma_kernel.losses import concept_loss
from dharma_kernel.train.session import TrainOptions, train

QUIET = Console(quiet=True)


def run(manifest: Path, **options):
    return train(manifest, TrainOptions(**options), QUIET)


def records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


# -- divergence ------------------------------------------------------------------------


def test_concept_loss_of_a_nan_score_is_nan_not_an_exception():
    labels = torch.tensor([[1, 0, 1]])
    counted = torch.ones(1, 3, dtype=torch.bool)
    score = torch.tensor([[0.9, 0.2, 0.6]])
    expected = F.binary_cross_entropy(score.flatten(), labels.flatten().float())
    torch.testing.assert_close(concept_loss(score, labels, counted), expected)
    assert torch.isnan(concept_loss(torch.tensor([[0.9, math.nan, 0.6]]), labels, counted))


def test_a_diverging_run_with_modules_stops_cleanly_and_names_no_bad_checkpoint(tmp_path):
    # learning_rate 1e6 makes the module scores NaN by the second step.
    path = write_manifest(tmp_path, train={"learning_rate": 1e6}, extra="[loss]\nconcept = 0\n")
    with pytest.warns(UserWarning, match="not saving step 4: its evaluation loss is not finite"):
        with pytest.raises(DharmaError, match="not finite for 5 steps in a row") as err:
            run(path)
    assert "no good checkpoint was saved" in str(err.value)
    root = tmp_path / "run"
    assert not (root / "latest").exists() and not (root / "best").exists()
    assert not list(root.glob("checkpoints/step-*"))


def test_a_checkpoint_whose_evaluation_is_not_finite_is_never_latest_or_best(tmp_path, monkeypatch):
    from dharma_kernel.train.loop import Loop

    evaluate = Loop.evaluate

    def nan_at_step_4(self, batch_size):
        metrics = evaluate(self, batch_size)
        if self.progress.step == 4:
            metrics["eval_loss"] = metrics["eval_ppl"] = math.nan
        return metrics

    monkeypatch.setattr(Loop, "evaluate", nan_at_step_4)
    path = write_manifest(tmp_path, train={"max_steps": 6, "eval_every": 2})
    with pytest.warns(UserWarning, match="not saving step 4"):
        summary = run(path)
    root = tmp_path / "run"
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-00000002", "step-00000006"]
    assert summary.latest.name == "step-00000006" and summary.best.name in ("step-00000002", "step-00000006")
    for tensor in weights(summary.latest).values():
        assert torch.isfinite(tensor).all()
