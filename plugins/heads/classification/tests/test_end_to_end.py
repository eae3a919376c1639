"""Fine-tuning a tiny foundation on examples/data/classification: accuracy, saving, loading, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dharma_kernel.application import load_application
from dharma_kernel.errors import DharmaError
from dharma_kernel.model import DharmaModel
from dharma_kernel.testing import cli_output as dharma
from dharma_kernel.testing import tiny_foundation

DATA = Path(__file__).resolve().parents[4] / "examples" / "data" / "classification"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="examples/data/classification is not here")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def foundation(tmp_path_factory) -> Path:
    texts = [r["text"] for r in read(DATA / "train.jsonl")]
    return tiny_foundation(tmp_path_factory.mktemp("foundation") / "model", texts, modules=("paths.dharma",))


def finetune(capsys, foundation: Path, output: Path, *extra: str, data: Path = DATA / "train.jsonl") -> str:
    return dharma(capsys, "finetune", foundation, "--head", "classification", "--data", data,
                  "-o", output, "--max-length", 32, *extra)  # fmt: skip


def evals(app: Path) -> list[dict]:
    lines = (app.with_name(app.name + "-run") / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval_accuracy" in r]


def predictions(model, tokenizer, texts: list[str]) -> list[dict]:
    with torch.no_grad():
        return model.eval().heads["classification"].predict(model, tokenizer, [{"text": t} for t in texts])


def test_finetuning_beats_chance_and_the_application_predicts_as_trained(capsys, foundation, tmp_path):
    app = tmp_path / "apps" / "classifier"
    printed = finetune(capsys, foundation, app, "--eval", DATA / "test.jsonl", "--freeze", "spiritual",
                       "--head-option", "pooling=mean", "--epochs", 1, "--batch-size", 16,
                       "--eval-every", 25, "--learning-rate", 3e-3)  # fmt: skip
    first, last = evals(app)[0], evals(app)[-1]
    # 4 balanced labels, 120 held-out records: chance is 0.25. The untrained head scored
    # 0.258 here; after one epoch (25 steps), 0.842 (sentences, practices and subjects all unseen).
    assert first["step"] == 0 and first["eval_accuracy"] <= 0.4
    assert last["step"] == 25 and last["eval_accuracy"] >= 0.6 and last["eval_macro_f1"] >= 0.55
    assert f"application: {app}" in printed

    # Saved only what fine-tuning changed: the head and the trainable backbone, no module weights.
    adapter = load_file(str(app / "adapter.safetensors"))
    assert (
        "heads.classification.out.weight" in adapter
        and adapter["heads.classification.out.weight"].shape[0] == 4
    )
    assert any(name.startswith("backbone.") for name in adapter)
    assert not any(name.startswith("stacks.") for name in adapter)

    # Reloaded, it predicts what the best checkpoint predicts, bit for bit.
    texts = [r["text"] for r in read(DATA / "test.jsonl")[:16]]
    model, tokenizer = load_application(app)
    checkpoint = DharmaModel.from_pretrained(app.with_name("classifier-run") / "best")
    assert predictions(model, tokenizer, texts) == predictions(checkpoint, tokenizer, texts)

    shown = json.loads(dharma(capsys, "predict", app, texts[0], "--json"))
    assert shown == predictions(model, tokenizer, texts[:1])[0]
    assert dharma(capsys, "predict", app, texts[0]).splitlines()[0] == shown["label"]
    scored = json.loads(dharma(capsys, "eval", app, "--data", DATA / "test.jsonl", "--json"))
    assert scored["records"] == 120 and scored["accuracy"] == pytest.approx(last["eval_accuracy"])


def test_frozen_foundation_gives_a_small_application_that_refuses_another_foundation(
    capsys, foundation, tmp_path
):
    own = tmp_path / "foundation"
    shutil.copytree(foundation, own)
    app = tmp_path / "app"
    finetune(capsys, own, app, "--freeze", "backbone", "--freeze", "spiritual", "--max-steps", 2)
    adapter = load_file(str(app / "adapter.safetensors"))
    assert sorted(adapter) == ["heads.classification.out.bias", "heads.classification.out.weight"]
    size = (app / "adapter.safetensors").stat().st_size
    assert size < (own / "model.safetensors").stat().st_size / 50
    load_application(app)  # the foundation as it was: loads

    weights = load_file(str(own / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(own / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DharmaError, match="fine-tuned from a different foundation"):
        load_application(app)
    shutil.rmtree(own)
    with pytest.raises(DharmaError, match="its foundation model .* is missing"):
        load_application(app)


def test_a_finetune_manifest_merges_into_a_standalone_model(capsys, foundation, tmp_path):
    manifest = tmp_path / "classifier.toml"
    manifest.write_text(
        f'[finetune]\nfrom = "{foundation}"\nmerge = true\n'
        '[[heads]]\nplugin = "classification"\nconfig = { pooling = "mean" }\n'
        '[freeze]\ngroups = ["backbone"]\n'
        f'[data]\ntrain = ["{DATA / "train.jsonl"}"]\nmax_length = 32\n'
        '[train]\nmax_steps = 3\nbatch_size = 8\nlearning_rate = 1e-2\noutput = "merged"\n'
    )
    printed = dharma(capsys, "train", manifest)
    merged = tmp_path / "merged"
    lines = printed.splitlines()  # --merge wrote a model, and the report says so
    assert any(line.startswith(f"model: {merged}") for line in lines)
    assert not any(line.startswith("application:") for line in lines)
    assert (merged / "model.safetensors").exists() and not (merged / "adapter.safetensors").exists()
    model = DharmaModel.from_pretrained(merged)  # standalone: no foundation needed
    assert model.config.layout["heads"][0]["config"]["pooling"] == "mean"
    checkpoint = DharmaModel.from_pretrained(tmp_path / "merged-run" / "latest")
    _, tokenizer = load_application(merged)
    texts = [r["text"] for r in read(DATA / "test.jsonl")[:8]]
    assert predictions(model, tokenizer, texts) == predictions(checkpoint, tokenizer, texts)


def test_bad_records_label_mismatch_and_missing_plugin_are_clear(capsys, foundation, tmp_path):
    good = read(DATA / "train.jsonl")[:20]

    def write(name: str, records: list) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    no_label = write("no_label.jsonl", [*good[:2], {"text": "A record without its label."}, *good[2:]])
    with pytest.raises(DharmaError, match=r"no_label.jsonl:3: no 'label' field"):
        finetune(capsys, foundation, tmp_path / "a", "--strict", data=no_label)
    assert not (tmp_path / "a").exists()
    printed = finetune(capsys, foundation, tmp_path / "a", "--max-steps", 1, data=no_label)
    assert "dropped: 0 empty, 0 too_short, 0 duplicate, 1 malformed" in printed  # skipped, counted
    bad_type = write("bad_type.jsonl", [good[0], {"text": "x", "label": ["karma"]}, *good[1:]])
    with pytest.raises(
        DharmaError, match=r"bad_type.jsonl: record 2: 'label' must be a string or an integer"
    ):
        finetune(capsys, foundation, tmp_path / "b", data=bad_type)
    unseen = write("eval.jsonl", [good[0], {"text": "Seva is service.", "label": "seva"}])
    labels = r"\(bhakti, dhyana, jnana, karma\)"
    with pytest.raises(
        DharmaError, match=rf"eval.jsonl: record 2: label 'seva' is not one of the training labels {labels}"
    ):
        finetune(capsys, foundation, tmp_path / "c", "--eval", unseen, data=write("train.jsonl", good))
    assert not (tmp_path / "c").exists()

    app = tmp_path / "app"
    finetune(capsys, foundation, app, "--freeze", "backbone", "--max-steps", 1)
    info = json.loads((app / "application.json").read_text())
    info["heads"][0]["plugin"] = "sentiment"
    (app / "application.json").write_text(json.dumps(info))
    with pytest.raises(DharmaError, match="head plugin 'sentiment'.*\n.*pip install dharma-head-sentiment"):
        dharma(capsys, "predict", app, "some text")


def test_a_finetune_resumes_and_refuses_to_start_over(capsys, foundation, tmp_path):
    app = tmp_path / "app"
    finetune(capsys, foundation, app, "--max-steps", 2)
    first = load_file(str(app / "adapter.safetensors"))
    with pytest.raises(DharmaError, match="already holds a training run"):
        finetune(capsys, foundation, app, "--max-steps", 4)
    finetune(capsys, foundation, app, "--max-steps", 4, "--resume")
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "app-run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    resumed = load_file(str(app / "adapter.safetensors"))
    assert not torch.equal(
        first["heads.classification.out.weight"], resumed["heads.classification.out.weight"]
    )


def test_a_resumed_finetune_reports_its_first_and_best_evaluations(capsys, foundation, tmp_path):
    app = tmp_path / "app"
    eval_options = ("--eval", DATA / "test.jsonl", "--eval-every", 1)
    finetune(capsys, foundation, app, "--max-steps", 2, *eval_options)
    logged = {r["step"]: r for r in evals(app)}
    printed = finetune(capsys, foundation, app, "--max-steps", 3, "--resume", *eval_options)
    logged.update({r["step"]: r for r in evals(app)})
    best = min((r for step, r in logged.items() if step > 0), key=lambda r: r["eval_loss"])
    # the summary still knows the evaluation before fine-tuning and the best one, from metrics.jsonl
    expected = f"eval_accuracy {best['eval_accuracy']:.4f} at step {best['step']} "
    assert expected + f"(at the start: {logged[0]['eval_accuracy']:.4f})" in printed


def test_head_options_are_json_or_text_and_reach_the_saved_head(capsys, foundation, tmp_path):
    app = tmp_path / "app"
    finetune(capsys, foundation, app, "--head-option", "pooling=mean", "--head-option", "dropout=0.25",
             "--freeze", "backbone", "--max-steps", 1)  # fmt: skip
    config = json.loads((app / "application.json").read_text())["heads"][0]["config"]
    assert config["pooling"] == "mean" and config["dropout"] == 0.25
    model, _ = load_application(app)
    assert model.heads["classification"].config.dropout == 0.25
