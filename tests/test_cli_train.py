"""`dharma train` as a process: killed and resumed bit-exactly, Ctrl-C, errors, eval and generate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakedists import install, run_dharma
from trainkit import weights, write_manifest

# A hook plugin whose train callback sends this process a signal after a chosen step or save.
SIGNALLER = """
import os, signal
from dharma_kernel.hookspecs import hookimpl

class Signaller:
    def __init__(self):
        self.step = int(os.environ["SIGNAL_AT_STEP"])
        self.sig = getattr(signal, os.environ["SIGNAL_NAME"])

    def on_step(self, step, metrics):
        if os.environ.get("SIGNAL_ON") == "step" and step == self.step:
            os.kill(os.getpid(), self.sig)

    def on_save(self, path):
        if os.environ.get("SIGNAL_ON") == "save" and path.name == f"step-{self.step:08d}":
            os.kill(os.getpid(), self.sig)

@hookimpl
def dharma_train_callbacks():
    return [Signaller()]
"""


def signalling_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    install(site, "dharma-test-signaller", {"dharma.hooks": {"signaller": "dharma_test_signaller"}},
            {"dharma_test_signaller": SIGNALLER})  # fmt: skip
    return site


def train_process(site, manifest, *args, env=None):
    environment = {**os.environ, "NO_COLOR": "1", **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site) if site else None,
                                                              os.environ.get("PYTHONPATH")]))  # fmt: skip
    command = [sys.executable, "-m", "dharma_kernel", "train", str(manifest), *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


SETTINGS = {"max_steps": 9, "eval_every": 3, "save_every": 3}
# One thread: with two, CPU kernels may split sums differently from run to run, and two
# uninterrupted runs on a busy machine were seen to differ by one float32 ulp at step 1.
# Resume must not add any difference of its own, so the comparison needs exact kernels.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_a_killed_run_resumes_to_bit_identical_weights(tmp_path):
    site = signalling_site(tmp_path)
    whole = write_manifest(tmp_path / "whole", train=SETTINGS)
    killed = write_manifest(tmp_path / "killed", train=SETTINGS)
    assert train_process(None, whole, env=ONE_THREAD).returncode == 0

    kill = {"SIGNAL_ON": "save", "SIGNAL_AT_STEP": "6", "SIGNAL_NAME": "SIGKILL", **ONE_THREAD}
    result = train_process(site, killed, env=kill)
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / "killed" / "run" / "latest").resolve().name == "step-00000006"
    result = train_process(None, killed, "--resume", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr

    a, b = weights(tmp_path / "whole" / "run" / "latest"), weights(tmp_path / "killed" / "run" / "latest")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)  # bit-identical, dropout included

    def losses(folder):
        lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in map(json.loads, lines)]

    assert losses(tmp_path / "whole") == losses(tmp_path / "killed")


def test_ctrl_c_saves_the_current_step_and_says_how_to_resume(tmp_path):
    site = signalling_site(tmp_path)
    manifest = write_manifest(tmp_path, train={"max_steps": 50, "eval_every": 100})
    result = train_process(
        site, manifest, env={"SIGNAL_ON": "step", "SIGNAL_AT_STEP": "2", "SIGNAL_NAME": "SIGINT"}
    )
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert "interrupted: saved step 2" in result.stderr and "--resume" in result.stderr
    assert (tmp_path / "run" / "latest").resolve().name == "step-00000002"
    resumed = train_process(None, manifest, "--resume", "--max-steps", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert "trained 4 steps" in resumed.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "nowhere/*.txt"], "nowhere/*.txt: no files match this pattern"),
        (["--reset-optimizer"], "--reset-optimizer only applies with --resume"),
        (["--resume"], "holds no checkpoint to resume from"),
        (["--freeze", "nonsense"], "nonsense"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--max-steps", "0"], ""),
    ],
)
def test_user_mistakes_exit_2_without_a_traceback(tmp_path, args, message):
    result = run_dharma(None, "train", str(write_manifest(tmp_path)), *args)
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr and message in result.stderr


def test_tensorboard_asked_for_but_missing_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed here")
    result = run_dharma(None, "train", str(write_manifest(tmp_path, train={"tensorboard": True})))
    assert result.returncode == 2 and "pip install tensorboard" in result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    result = train_process(None, write_manifest(folder, train={"max_steps": 6, "eval_every": 3}))
    assert result.returncode == 0, result.stderr
    return folder


def test_generate_continues_a_prompt_reproducibly(trained):
    args = ["generate", str(trained / "run"), "Dharma is", "--max-new-tokens", "12", "--seed", "3"]
    first, again = run_dharma(None, *args), run_dharma(None, *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Dharma is") and len(first.stdout) > len("Dharma is\n")
    assert first.stdout == again.stdout
    greedy = run_dharma(None, *args, "--temperature", "0")
    assert greedy.returncode == 0 and greedy.stdout.startswith("Dharma is")


def test_eval_reports_perplexity_and_module_auc(trained):
    data = str(trained / "data")
    result = run_dharma(None, "eval", str(trained / "run"), "--data", data, "--max-length", "32", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] > 500 and 1 < report["perplexity"] < 400
    assert abs(report["perplexity"] - torch.tensor(report["loss"]).exp().item()) < 1e-3 * report["perplexity"]
    assert set(report["auc"]) == {"paths.dharma", "darshanas.vedanta"}


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_name_a_missing_model(tmp_path, command):
    extra = ["--data", str(tmp_path)] if command == "eval" else ["hello"]
    result = run_dharma(None, command, str(tmp_path / "nope"), *extra)
    assert (
        result.returncode == 2 and f"error: {tmp_path / 'nope'}: no such file or directory" in result.stderr
    )
