"""``[train] compile = true``: a compiled run trains, saves and resumes like an eager one.

One compiled run is shared by the tests (module-level fixture): inductor's compile is what
takes the time on a CPU, the steps themselves are tiny. With a fresh inductor cache this file
took 131 s at load 2-3.5 on 2 cores (228 s with trainkit's 2 layers, hence 1 layer here).
Dropout is 0: compiled code draws other random numbers than eager code.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from rich.console import Console
from trainkit import weights, write_manifest

from dharma_kernel.errors import DharmaError
from dharma_kernel.model import DharmaModel
from dharma_kernel.train.compiled import check_compile
from dharma_kernel.train.distributed import Dist
from dharma_kernel.train.run import TrainOptions, train

QUIET = Console(quiet=True)
# 2 steps of 2 micro-batches each.
# A constant learning rate: a 2-step run then takes the same steps as the first 2 of a 3-step one.
SETTINGS = {"max_steps": 2, "eval_every": 2, "save_every": 1, "schedule": "constant", "warmup_fraction": 0.0}


def tiny(folder, **train_settings):
    """trainkit's manifest cut to 1 layer (with its 2 routed modules): half the graphs to compile."""
    path = write_manifest(folder, dropout=0.0, train={**SETTINGS, **train_settings})
    text = path.read_text().replace("n_layer = 2", "n_layer = 1")
    path.write_text(text.replace("at_layers = [0, 1]", "at_layers = [0]"))
    return path


def losses(root):
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An eager run of 4 steps; a compiled run of 2, then resumed eagerly for its 3rd and 4th."""
    root = tmp_path_factory.mktemp("compile")
    train(tiny(root / "eager", max_steps=4, keep_last=4), TrainOptions(), QUIET)
    train(tiny(root / "compiled", compile=True), TrainOptions(), QUIET)
    return root / "eager" / "run", root / "compiled" / "run"


def test_compiled_and_eager_training_losses_agree(runs):
    eager, compiled = (losses(root) for root in runs)
    assert sorted(compiled) == [1, 2]
    for step, loss in compiled.items():
        assert loss == pytest.approx(eager[step], rel=1e-5)
    assert compiled[2] != compiled[1]  # the model moved


def test_a_compiled_checkpoint_loads_into_an_eager_model_with_equal_logits(runs):
    eager, compiled = (root / "checkpoints" / "step-00000002" for root in runs)
    saved = weights(compiled)
    assert sorted(saved) == sorted(weights(eager))  # no "_orig_mod." names
    assert not any("_orig_mod" in name for name in saved)
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for directory in (eager, compiled):
        model = DharmaModel.from_pretrained(directory).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_a_compiled_run_resumes_its_optimizer_and_schedule(runs, tmp_path):
    """The compiled run's step-2 checkpoint, resumed for a 3rd and 4th step (eagerly: compiling
    again would double the test's time), takes the eager run's steps. The 4th loss is the one
    the resumed optimizer state decides (the 3rd is the checkpoint's weights')."""
    eager, compiled = runs
    copy = shutil.copytree(compiled.parent, tmp_path / "copy", symlinks=True)  # latest/ is a relative link
    manifest = copy / "m.toml"
    manifest.write_text(manifest.read_text().replace("compile = true", "compile = false"))
    train(manifest, TrainOptions(resume=True, max_steps=4), QUIET)
    resumed = losses(copy / "run")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses(eager)[step], rel=1e-5)


def test_compile_refuses_what_it_is_not_tested_with(tmp_path):
    manifest = write_manifest(tmp_path, train={"compile": True, "gradient_checkpointing": True})
    with pytest.raises(DharmaError, match="cannot be combined with train.gradient_checkpointing"):
        train(manifest, TrainOptions(), QUIET)

    class Settings:
        compile = True
        gradient_checkpointing = False

    with pytest.raises(DharmaError, match="one process only, not under torchrun"):
        check_compile(Settings(), Dist(world=2))
    check_compile(Settings(), Dist())  # one process: accepted


def test_a_compiled_run_with_capacity_trains_its_modules_flat(tmp_path, monkeypatch):
    """With fixed capacity every module computes at every step, so train.compile trains the
    modules' parameters as flat tensors (dharma_kernel.train.flat): the eager run's losses, a
    checkpoint with the eager run's weights, a state that resumes eagerly, and parameters that
    own their storage again afterwards. Dynamo and AOT autograd trace the flat forward and its
    backward here (aot_eager); inductor's code generation is the first test's."""
    from dharma_kernel.train import session

    real, flat, made = torch.compile, session.for_compiled_training, []
    monkeypatch.setattr(torch, "compile", lambda target, **kw: real(target, **kw, backend="aot_eager"))
    monkeypatch.setattr(session, "for_compiled_training", lambda *a: made.append(flat(*a)) or made[-1])

    def capacity(folder, **settings):
        path = tiny(folder, **settings)
        path.write_text(path.read_text().replace("top_k = 1\n", "top_k = 1\ncapacity_factor = 1.25\n"))
        return path

    train(capacity(tmp_path / "eager", max_steps=4, keep_last=4), TrainOptions(), QUIET)
    train(capacity(tmp_path / "compiled", compile=True), TrainOptions(), QUIET)
    eager, compiled = tmp_path / "eager" / "run", tmp_path / "compiled" / "run"
    held = made[-1]
    # eager: nothing flat; compiled: the 2 modules' parameters and the router's
    assert made[0] is None and held is not None
    names = [name.split(".") for f in held.flats for name in f.names]
    assert {name[3] for name in names if name[2] == "members"} == {"paths__dharma", "darshanas__vedanta"}
    assert {".".join(name[2:]) for name in names if name[2] != "members"} == {
        "router.weight",
        "token_prior.weight",
        "prior_out",
    }
    first, second = held.flats[0].params[:2]
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()  # released
    for step, loss in losses(compiled).items():
        assert loss == pytest.approx(losses(eager)[step], rel=1e-5)
    step_two = [root / "checkpoints" / "step-00000002" for root in (eager, compiled)]
    saved = [weights(directory) for directory in step_two]
    assert sorted(saved[1]) == sorted(saved[0])
    for name, value in saved[0].items():
        torch.testing.assert_close(saved[1][name], value, rtol=1e-5, atol=1e-5, msg=name)
    copy = shutil.copytree(compiled.parent, tmp_path / "copy", symlinks=True)
    manifest = copy / "m.toml"
    manifest.write_text(manifest.read_text().replace("compile = true", "compile = false"))
    train(manifest, TrainOptions(resume=True, max_steps=4), QUIET)
    for step in (3, 4):  # the 4th: after a step with the resumed optimizer state
        assert losses(copy / "run")[step] == pytest.approx(losses(eager)[step], rel=1e-5)
