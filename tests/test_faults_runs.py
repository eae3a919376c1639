"""Faults in training runs: divergence, damaged run directories, concurrent writers, kills and a
full disk while a checkpoint is written. Each ends in one clear error (or a warning and a
recovery), and what was saved before survives."""

from __future__ import annotations

import errno
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from trainkit import weights, write_manifest

from dharma_kernel.errors import DharmaError
from dharma_kernel.losses import concept_losses
from dharma_kernel.testing import one_thread
from dharma_kernel.train.run import TrainOptions, train

QUIET = Console(quiet=True)


def run(manifest: Path, **options):
    return train(manifest, TrainOptions(**options), QUIET)


def records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


# -- divergence ------------------------------------------------------------------------


def test_concept_loss_of_a_nan_score_is_nan_not_an_exception():
    labels = torch.tensor([[1, 0, 1]])[..., None]
    counted = torch.ones(1, 3, 1, dtype=torch.bool)
    score = torch.tensor([[0.9, 0.2, 0.6]])[..., None]
    expected = F.binary_cross_entropy(score.flatten(), labels.flatten().float())
    loss, has = concept_losses(score, labels, counted)
    torch.testing.assert_close(loss, expected[None])
    assert has.tolist() == [True]
    nan = torch.tensor([[0.9, math.nan, 0.6]])[..., None]
    assert torch.isnan(concept_losses(nan, labels, counted)[0]).all()


def test_a_nan_score_where_nothing_counts_gives_neither_loss_nor_gradient():
    leaf = torch.tensor([[0.9, math.nan, 0.6]], requires_grad=True)
    score = leaf[..., None]
    labels = torch.tensor([[1, 0, -100]])[..., None]
    counted = torch.tensor([[True, False, True]])[..., None]
    loss, has = concept_losses(score, labels, counted)
    loss.sum().backward()
    torch.testing.assert_close(loss, -torch.tensor([0.9]).log())
    assert leaf.grad.tolist() == [[pytest.approx(-1 / 0.9), 0.0, 0.0]]


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


def test_training_in_process_puts_back_the_signal_handlers_it_found(tmp_path):
    """A program (or pytest) that trains in-process keeps its own Ctrl-C and SIGTERM afterwards."""

    def mine(signum, frame):
        raise AssertionError("not called")

    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(write_manifest(tmp_path / "ok", train={"max_steps": 2, "eval_every": 2}))
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(DharmaError, match="not finite"):  # and when the run ends in an error
            run(write_manifest(tmp_path / "bad", train={"learning_rate": 1e6}, extra="[loss]\nconcept = 0\n"))
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


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


class Killed(BaseException):
    """A kill, as far as the code it stops can tell: no ``except Exception`` catches it."""


# -- run directories ---------------------------------------------------------------------

SHORT = {"max_steps": 4, "eval_every": 2, "save_every": 2}


@pytest.fixture
def single_thread():
    with one_thread():
        yield


def test_a_second_writer_is_refused_while_the_first_holds_the_run(tmp_path, capsys):
    from dharma_kernel.testing import run_cli

    path = write_manifest(tmp_path, modules=False, train=SHORT)
    root = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out, err = run_cli(capsys, "train", path, "-o", root)
        assert code == 2 and "Traceback" not in err
        assert f"error: {root} is in use by another `dharma train` (pid {holder.pid} " in err
        assert sorted(p.name for p in root.iterdir()) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.communicate("")
    code, out, err = run_cli(capsys, "train", path, "-o", root)
    assert code == 0, err
    assert (root / "latest").resolve().name == "step-00000004" and not (root / ".lock").exists()


HOLD_LOCK = """
import sys
from pathlib import Path
from dharma_kernel.train.runlock import run_lock

with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    path = write_manifest(tmp_path, modules=False, train=SHORT)
    root = tmp_path / "run"
    root.mkdir()
    (root / ".lock").write_text("pid 999999999 on elsewhere\n")  # no process holds it
    with pytest.warns(
        UserWarning, match=r"taking over the lock of a run that is no longer running \(pid 999999999"
    ):
        summary = run(path)
    assert summary.steps == 4 and not (root / ".lock").exists()


@pytest.mark.parametrize("left", ["dangling latest", "metrics", "checkpoints"])
def test_starting_over_any_trace_of_a_run_is_refused(tmp_path, left):
    path = write_manifest(tmp_path, modules=False, train=SHORT)
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    if left == "dangling latest":
        (root / "latest").symlink_to("checkpoints/step-00000002")
        (root / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    elif left == "metrics":
        (root / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    else:
        (root / "checkpoints" / "step-00000002").mkdir()
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(DharmaError, match="already holds a training run"):
        run(path)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not (root / "best").exists()


def test_resume_drops_a_torn_last_metrics_line_and_cleans_what_a_kill_left(
    tmp_path, monkeypatch, single_thread
):
    from dharma_kernel.train.rundir import RunDir

    path = write_manifest(tmp_path, modules=False, train=SHORT)
    whole = run(write_manifest(tmp_path / "whole", modules=False, train=SHORT))
    log = RunDir.log

    def torn_at_step_3(self, record):
        if record["step"] != 3:
            return log(self, record)
        with self.metrics.open("a") as f:
            f.write(json.dumps(record)[:20])
        raise Killed("while writing metrics")

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "log", torn_at_step_3)
        with pytest.raises(Killed):
            run(path)
    root = tmp_path / "run"
    staging = root / "checkpoints" / ".step-00000004.k2j4"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    (root / ".best.tmp").symlink_to(staging)
    with pytest.warns(UserWarning, match=r"metrics.jsonl, line \d+: dropped a torn last record"):
        summary = run(path, resume=True)
    assert summary.steps == 4
    assert not staging.exists() and not (root / ".best.tmp").is_symlink()
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert [r["step"] for r in records(root) if "loss" in r] == [1, 2, 3, 4]
    a, b = weights(whole.latest), weights(summary.latest)
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json at all", "line 1: not JSON"),
        ('["a list"]', "line 1: a record needs an integer 'step'"),
        ('{"step": "two"}', "line 1: a record needs an integer 'step'"),
        ('{"loss": 1.0}', "needs an integer"),
    ],
)
def test_resume_over_damaged_metrics_names_the_line(tmp_path, capsys, line, message):
    from dharma_kernel.testing import run_cli

    path = write_manifest(tmp_path, modules=False, train={**SHORT, "max_steps": 2})
    run(path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(line + "\n" + metrics.read_text())
    code, out, err = run_cli(capsys, "train", path, "--resume", "--max-steps", "3")
    assert code == 2 and "Traceback" not in err
    assert message in err and str(metrics) in err


# -- kills and a full disk while a checkpoint is written ---------------------------------------

STEP_4 = "step-00000004"


def fail_at(monkeypatch, owner, name: str, error: BaseException, only: str | None = None) -> None:
    """``owner.name`` raises ``error`` when called for the step-4 checkpoint (a path argument names
    it), and, with ``only``, when its first argument is ``only`` (which link ``point`` swaps)."""
    original = getattr(owner, name)

    def failing(*args, **kwargs):
        texts = [str(a) for a in args]
        if any(STEP_4 in t for t in texts) and (only is None or only in texts):
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def _model_class():
    from dharma_kernel.model import DharmaModel

    return DharmaModel


def _tokenizer_class():
    from transformers import PreTrainedTokenizerBase

    return PreTrainedTokenizerBase


def _module(name: str):
    import importlib

    return importlib.import_module(name)


# Each write of a checkpoint, in order: weights, tokenizer, card, training state, the rename
# into place, then the latest and best links.
WRITE_STEPS = {
    "weights": (lambda: _module("transformers.modeling_utils"), "safe_save_file", None),
    "tokenizer": (_tokenizer_class, "save_pretrained", None),
    "card": (lambda: _module("dharma_kernel.checkpoint"), "write_card", None),
    "training state": (lambda: _module("dharma_kernel.train.session"), "save_state", None),
    "rename": (lambda: _module("dharma_kernel.checkpoint"), "_replace", None),
    "latest link": (lambda: _module("dharma_kernel.train.rundir").RunDir, "point", "latest"),
    "best link": (lambda: _module("dharma_kernel.train.rundir").RunDir, "point", "best"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The weights of a whole 4-step run, to compare every recovered run with."""
    with one_thread():
        summary = run(write_manifest(tmp_path_factory.mktemp("whole"), modules=False, train=SHORT))
    return weights(summary.latest)


def assert_complete(root: Path) -> None:
    """Every link names a checkpoint whose weights load and are finite."""
    for name in ("latest", "best"):
        if (root / name).is_symlink():
            for tensor in weights(root / name).values():
                assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("where", list(WRITE_STEPS))
def test_a_kill_at_each_write_of_a_checkpoint_keeps_the_last_one_and_resumes_equal(
    tmp_path, monkeypatch, single_thread, uninterrupted, where
):
    owner, name, only = WRITE_STEPS[where]
    path = write_manifest(tmp_path, modules=False, train=SHORT)
    root = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail_at(patch, owner(), name, Killed(where), only)
        with pytest.raises(Killed):
            run(path)
    latest = (root / "latest").resolve().name
    # Until the latest link is swapped, the run's checkpoint is step 2's, untouched.
    assert latest == ("step-00000004" if where == "best link" else "step-00000002")
    assert (root / "best").resolve().name == "step-00000002"
    assert_complete(root)
    summary = run(path, resume=True)
    assert summary.steps == 4 and summary.latest.name == STEP_4
    assert not list((root / "checkpoints").glob(".*")) and not list(root.glob(".*.tmp"))
    resumed = weights(summary.latest)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def _safetensors_error():
    from safetensors import SafetensorError

    return SafetensorError(
        "Error while serializing: "
        'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("weights", lambda: OSError(errno.ENOSPC, "No space left on device")),
        ("weights", _safetensors_error),
        ("training state", lambda: OSError(errno.ENOSPC, "No space left on device")),
    ],
    ids=["weights-ENOSPC", "weights-SafetensorError", "training-state-ENOSPC"],
)
def test_a_full_disk_while_saving_is_one_error_and_the_earlier_checkpoint_survives(
    tmp_path, monkeypatch, capsys, single_thread, uninterrupted, where, error
):
    from dharma_kernel.testing import run_cli

    owner, name, only = WRITE_STEPS[where]
    path = write_manifest(tmp_path, modules=False, train=SHORT)
    root = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail_at(patch, owner(), name, error(), only)
        code, out, err = run_cli(capsys, "train", path)
    assert code == 2 and "Traceback" not in err
    assert f"error: no space left on device writing {root / 'checkpoints' / STEP_4}: it needs at least" in err
    assert "MiB for the weights" in err
    assert (root / "latest").resolve().name == "step-00000002"
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-00000002"]
    assert_complete(root)
    code, out, err = run_cli(capsys, "train", path, "--resume")  # space freed
    assert code == 0, err
    resumed = weights(root / "latest")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_torch_save_losing_its_cause_on_a_full_disk_is_still_named(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from dharma_kernel.testing import run_cli

    owner, name, only = WRITE_STEPS["training state"]
    path = write_manifest(tmp_path, modules=False, train=SHORT)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda where: usage(10**9, 10**9 - 4096, 4096))
    fail_at(
        monkeypatch,
        owner(),
        name,
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
    )
    code, out, err = run_cli(capsys, "train", path)
    assert code == 2 and "error: no space left on device writing" in err and "0.0 MiB free there" in err


def test_a_full_disk_while_logging_metrics_is_one_error(tmp_path, monkeypatch, capsys):
    from dharma_kernel.testing import run_cli

    path = write_manifest(tmp_path, modules=False, train=SHORT)
    open_ = Path.open

    def full_once_saved(self, mode="r", *args, **kwargs):
        # The disk fills up after the first checkpoint (step 2): the next record is step 3's.
        if self.name == "metrics.jsonl" and mode == "a" and (self.parent / "latest").is_symlink():
            raise OSError(errno.ENOSPC, "No space left on device")
        return open_(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_once_saved)
    code, out, err = run_cli(capsys, "train", path)
    assert code == 2 and "Traceback" not in err
    assert (
        f"error: cannot write {tmp_path / 'run' / 'metrics.jsonl'}: [Errno 28] No space left on device" in err
    )
    assert (tmp_path / "run" / "latest").resolve().name == "step-00000002"


# -- the vocabulary ----------------------------------------------------------------------------


def test_a_trained_tokenizer_sets_a_fresh_backbones_vocabulary(tmp_path):
    from dharma_kernel.assemble import plan
    from dharma_kernel.manifest import load_manifest

    path = write_manifest(tmp_path, modules=False, train={**SHORT, "max_steps": 1})
    text = path.read_text().replace("vocab_size = 400, ", "")
    path.write_text(text.replace("[data]", "tokenizer = { train = true, vocab_size = 600 }\n[data]"))
    assert plan(load_manifest(path)).config.text_config.vocab_size == 600
    summary = run(path)
    assert weights(summary.latest)["backbone.transformer.wte.weight"].shape[0] == 600
    # backbone.config's own vocab_size still wins
    path.write_text(
        text.replace("n_positions = 64,", "n_positions = 64, vocab_size = 700,").replace(
            "[data]", "tokenizer = { train = true, vocab_size = 600 }\n[data]"
        )
    )
    assert plan(load_manifest(path)).config.text_config.vocab_size == 700
