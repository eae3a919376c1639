"""The run directory: latest/best links always name complete checkpoints; pruning keeps them."""

from __future__ import annotations

import json

import pytest

from dharma_kernel.errors import DharmaError
from dharma_kernel.train.rundir import RunDir, model_directory


def fake_checkpoint(run: RunDir, step: int):
    path = run.step_dir(step)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "dharma"}))
    return path


def test_links_and_pruning(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (10, 20, 30, 40):
        path = fake_checkpoint(run, step)
        run.point("latest", path)
        if step == 20:
            run.point("best", path)
        run.prune(keep_last=2)
    kept = sorted(p.name for p in run.checkpoints.iterdir())
    assert kept == ["step-00000020", "step-00000030", "step-00000040"]  # best survives pruning
    assert run.link("latest") == run.step_dir(40).resolve()
    assert run.link("best") == run.step_dir(20).resolve()
    assert (tmp_path / "run" / "latest").is_symlink()


def test_a_link_to_an_incomplete_checkpoint_does_not_count(tmp_path):
    run = RunDir(tmp_path)
    half = run.step_dir(5)
    half.mkdir(parents=True)
    run.point("latest", half)
    assert run.link("latest") is None and not run.has_run()


def test_metrics_after_the_resumed_step_are_forgotten(tmp_path):
    run = RunDir(tmp_path)
    for step in range(1, 6):
        run.log({"step": step, "loss": 1.0 / step})
    run.truncate_metrics(3)
    assert [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()] == [1, 2, 3]


def test_model_directory_resolves_runs_to_their_best_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    run.point("latest", fake_checkpoint(run, 2))
    assert model_directory(run.root) == run.step_dir(2).resolve()
    run.point("best", fake_checkpoint(run, 1))
    assert model_directory(run.root) == run.step_dir(1).resolve()
    assert model_directory(run.step_dir(2)) == run.step_dir(2)
    with pytest.raises(DharmaError, match="no such model or run directory"):
        model_directory(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DharmaError, match="neither a saved model"):
        model_directory(tmp_path / "empty")
