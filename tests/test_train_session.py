"""`dharma train` in-process: a run's files, token-weighted accumulation, non-finite steps."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from trainkit import weights, write_manifest

from dharma_kernel.errors import DharmaError
from dharma_kernel.model import DharmaModel
from dharma_kernel.train.run import TrainOptions, train

QUIET = Console(quiet=True)


def run(manifest, **options):
    return train(manifest, TrainOptions(**options), QUIET)


def test_a_run_writes_checkpoints_metrics_and_a_loadable_best_model(tmp_path):
    summary = run(write_manifest(tmp_path))
    root = tmp_path / "run"
    assert summary.steps == 8 and summary.output == root and summary.skipped == 0
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    assert summary.latest == (root / "checkpoints" / "step-00000008").resolve()
    assert summary.best_eval_ppl < summary.first_eval_ppl
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 4, 8]
    assert all(r["tokens"] > 0 and r["tok_per_s"] > 0 for r in records if "loss" in r)
    model = DharmaModel.from_pretrained(summary.best)
    assert model.module_refs == ["paths.dharma", "darshanas.vedanta"]
    assert (summary.best / "tokenizer.json").exists() and (summary.best / "trainer_state.pt").exists()


def grads_after_one_step(manifest, monkeypatch, batch_size, grad_accum):
    """The gradient the optimizer is handed in the first step."""
    from dharma_kernel.train import optim

    seen = {}

    def record(self):
        seen.update({i: p.grad.clone() for i, p in enumerate(self.trainable) if p.grad is not None})
        raise SystemExit("stop after the first step")

    monkeypatch.setattr(optim.Optimizer, "step", record)
    options = {"batch_size": batch_size, "grad_accum": grad_accum}
    path = write_manifest(
        manifest, modules=False, dropout=0.0, train={**options, "max_grad_norm": 0.0, "precision": "fp32"}
    )
    with pytest.raises(SystemExit):
        run(path)
    return seen


def test_accumulation_weights_each_token_equally(tmp_path, monkeypatch):
    # max_length 32 packs the corpus into rows whose last one is padded: micro-batches of
    # 1 row hold different token counts, so a per-micro-batch mean would differ here.
    whole = grads_after_one_step(tmp_path / "a", monkeypatch, batch_size=4, grad_accum=1)
    split = grads_after_one_step(tmp_path / "b", monkeypatch, batch_size=1, grad_accum=4)
    assert whole.keys() == split.keys() and len(whole) > 10
    for i in whole:
        torch.testing.assert_close(split[i], whole[i], rtol=1e-4, atol=1e-6)


def nan_loss_at(monkeypatch, steps: set[int]):
    """Make the model's loss NaN on the given optimizer steps (counted from 1)."""
    forward = DharmaModel.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if (calls["n"] + 1) // 2 in steps:  # grad_accum 2: two forwards per step
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DharmaModel, "forward", poisoned)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {3})
    summary = run(write_manifest(tmp_path))
    assert summary.steps == 8 and summary.skipped == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3]
    for tensor in weights(summary.latest).values():
        assert torch.isfinite(tensor).all()


def test_repeated_non_finite_steps_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {5, 6, 7})
    path = write_manifest(tmp_path, train={"max_nonfinite": 3})
    with pytest.raises(DharmaError, match=r"not finite for 3 steps in a row \(up to step 7\)") as err:
        run(path)
    assert "the last good checkpoint is" in str(err.value) and "step-00000004" in str(err.value)
    assert (tmp_path / "run" / "latest").resolve().name == "step-00000004"


def test_starting_over_an_existing_run_is_refused(tmp_path):
    path = write_manifest(tmp_path, train={"max_steps": 2, "eval_every": 2})
    run(path)
    before = weights(tmp_path / "run" / "latest")
    with pytest.raises(DharmaError, match="already holds a training run"):
        run(path)
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path / "run" / "latest").items())
    with pytest.raises(DharmaError, match="holds no checkpoint to resume from"):
        run(path, resume=True, output=str(tmp_path / "elsewhere"))


def test_resume_refuses_a_changed_trainable_set_unless_told(tmp_path):
    path = write_manifest(tmp_path, train={"max_steps": 2, "eval_every": 2})
    run(path)
    with pytest.raises(DharmaError, match="trainable parameters differ"):
        run(path, resume=True, max_steps=3, freeze=["backbone"])
    summary = run(path, resume=True, max_steps=3, freeze=["backbone"], reset_optimizer=True)
    assert summary.steps == 3


def test_optimizer_in_backward_trains(tmp_path):
    path = write_manifest(
        tmp_path, train={"grad_accum": 1, "optimizer_in_backward": True, "optimizer_state": "bf16"}
    )
    summary = run(path)
    assert summary.steps == 8 and summary.best_eval_ppl < summary.first_eval_ppl
