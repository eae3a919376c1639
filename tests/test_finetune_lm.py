"""`dharma finetune` without a head: the language model itself, saved as an application."""

from __future__ import annotations

import json

from safetensors.torch import load_file
from trainkit import SENTENCES, write_corpus

from dharma_kernel.testing import cli_output as dharma
from dharma_kernel.testing import run_cli, tiny_foundation


def test_lm_finetune_writes_an_application_that_evaluates_like_its_checkpoint(capsys, tmp_path):
    foundation = tiny_foundation(tmp_path / "foundation", SENTENCES * 4, modules=("paths.dharma",))
    corpus = write_corpus(tmp_path / "data")
    app = tmp_path / "lm"
    printed = dharma(capsys, "finetune", foundation, "--data", corpus, "-o", app, "--freeze", "spiritual",
                     "--max-steps", 3, "--max-length", 32, "--batch-size", 4)  # fmt: skip
    assert f"application: {app}" in printed
    adapter = load_file(str(app / "adapter.safetensors"))
    assert any(n.startswith("backbone.") for n in adapter) and not any(
        n.startswith("stacks.") for n in adapter
    )
    assert json.loads((app / "application.json").read_text())["heads"] == []

    run = tmp_path / "lm-run"
    of_app = json.loads(dharma(capsys, "eval", app, "--data", corpus, "--max-length", 32, "--json"))
    of_run = json.loads(dharma(capsys, "eval", run, "--data", corpus, "--max-length", 32, "--json"))
    of_foundation = json.loads(
        dharma(capsys, "eval", foundation, "--data", corpus, "--max-length", 32, "--json")
    )
    assert of_app["perplexity"] == of_run["perplexity"] < of_foundation["perplexity"]


def test_validate_and_assemble_refuse_a_finetune_manifest(capsys, tmp_path):
    manifest = tmp_path / "ft.toml"
    manifest.write_text('[finetune]\nfrom = "runs/foundation"\n[[heads]]\nplugin = "classification"\n')
    for command in (["validate"], ["assemble", "-o", tmp_path / "out"]):
        code, _, err = run_cli(capsys, *command, manifest)
        assert code == 2
        assert "fine-tunes runs/foundation ([finetune]): it describes no model to build" in err
        assert f"dharma train {manifest}" in err
