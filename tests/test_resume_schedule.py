"""Resuming with another total re-plans the learning-rate schedule over it, and says so."""

from __future__ import annotations

import json

import pytest
from trainkit import write_manifest

from dharma_kernel.testing import run_cli
from dharma_kernel.train.optim import lr_factor


def logged_lr(run, step: int) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["lr"] for r in records if r.get("step") == step and "lr" in r)


def test_a_resume_to_a_new_total_says_what_happens_to_the_schedule(tmp_path, capsys):
    manifest = write_manifest(
        tmp_path, modules=False, train={"max_steps": 4, "eval_every": 4, "log_every": 1}
    )
    code, _, err = run_cli(capsys, "train", manifest, "--quiet")
    assert code == 0, err
    run = tmp_path / "run"

    code, _, err = run_cli(capsys, "train", manifest, "--resume", "--max-steps", "8")
    assert code == 0, err
    old = 3e-3 * lr_factor("onecycle", 4, 4, 0.05)  # past the 4-step schedule: its final rate
    new = 3e-3 * lr_factor("onecycle", 4, 8, 0.05)
    assert new > 1000 * old
    assert (
        "warning: the run's onecycle schedule spanned 4 steps; resuming to 8 re-plans it over 8: step 5 "
        f"trains at learning rate {new:.3g} ({old:.3g} on the old schedule), then the rate follows the "
        "8-step schedule"
    ) in err
    # metrics log, at each step, the rate of the next one: the 8-step schedule's
    assert logged_lr(run, 5) == pytest.approx(3e-3 * lr_factor("onecycle", 5, 8, 0.05))

    code, _, err = run_cli(capsys, "train", manifest, "--resume", "--max-steps", "8")
    assert code == 0 and "schedule spanned" not in err  # the same total: nothing to say
