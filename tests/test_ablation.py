"""Ablation: perplexity with each family, each module or all modules switched off, beside the full model."""

from __future__ import annotations

import json

import pytest
import torch
from trainkit import SENTENCES

from dharma_kernel import registry
from dharma_kernel.ablation import ablate
from dharma_kernel.assemble import build_model
from dharma_kernel.data import Record, pack, train_tokenizer
from dharma_kernel.evaluate import lm_totals, perplexity
from dharma_kernel.testing import cli_output, perturb, run_cli, tiny_backbone_config

# Two families, one of them with two modules, so a family row switches off more than one.
REFS = ["paths.dharma", "darshanas.vedanta", "paths.karma"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(SENTENCES, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    configs = {ref: registry.load(registry.resolve(ref, "module")).make_config("tiny") for ref in REFS}
    modules = [{"ref": ref, "config": config.model_dump()} for ref, config in configs.items()]
    layout = {"at_layers": [0, 1], "composition": "routed", "top_k": 1, "modules": modules}
    model = build_model(tiny_backbone_config(vocab_size=len(tokenizer)), layout, seed=0)
    perturb(model.stacks, seed=1, std=0.1)  # fresh modules add zero; these must add something
    return model.eval()


@pytest.fixture(scope="module")
def packed(tokenizer, model):
    return pack([Record(text=s) for s in SENTENCES], tokenizer, max_length=32, refs=model.module_refs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, tokenizer):
    folder = tmp_path_factory.mktemp("ablation")
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "heldout.txt").write_text("\n\n".join(SENTENCES))
    return folder


def test_families_mode_gives_the_full_model_then_one_row_per_family(model, packed):
    rows = ablate(model, packed, batch_size=4, mode="families")
    assert [(row.off, row.modules_off) for row in rows] == [
        (None, 0),
        ("paths", 2),
        ("darshanas", 1),
        ("all", 3),
    ]
    assert rows[0].change == 0.0
    for row in rows:
        assert row.perplexity == pytest.approx(perplexity(row.loss))
        assert row.change == pytest.approx(row.perplexity / rows[0].perplexity - 1.0)


def test_modules_mode_gives_one_row_per_module(model, packed):
    rows = ablate(model, packed, batch_size=4, mode="modules")
    assert [row.off for row in rows] == [None, *model.module_refs, "all"]
    assert [row.modules_off for row in rows] == [0, 1, 1, 1, 3]


def test_all_is_the_model_with_every_module_switched_off_and_differs_from_full(model, packed):
    full, every = ablate(model, packed, batch_size=4, mode="all")
    assert (every.off, every.modules_off) == ("all", len(REFS))
    with model.switched_off(model.module_refs):
        loss_sum, count = lm_totals(model, packed, 4)
    assert every.loss == pytest.approx(loss_sum / count, rel=1e-6)
    loss_sum, count = lm_totals(model, packed, 4)
    assert full.loss == pytest.approx(loss_sum / count, rel=1e-6)
    assert abs(every.change) > 1e-3  # the perturbed modules change what the model predicts


def test_ablation_leaves_the_model_as_it_was(model, packed):
    batch = packed.batch([0, 1])
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for mode in ("families", "modules", "all"):
        ablate(model, packed, batch_size=4, mode=mode)
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)
    assert all(not stack.disabled for stack in model.stacks.values())


def test_eval_ablate_prints_the_same_numbers_as_its_json(capsys, saved):
    args = ["eval", saved / "model", "--data", saved / "heldout.txt", "--max-length", "32"]
    args += ["--ablate", "families"]
    report = json.loads(cli_output(capsys, *args, "--json"))
    rows = report["ablation"]
    assert [row["off"] for row in rows] == [None, "paths", "darshanas", "all"]
    assert rows[0]["perplexity"] == pytest.approx(report["perplexity"], rel=1e-6)
    # Table rows: name, modules off, loss, perplexity, change (none for the full model).
    printed = {}
    for line in cli_output(capsys, *args).splitlines():
        words = line.split()
        if words[:1] == ["none"]:
            printed[None] = words[3:]  # "none (full model)"
        elif words[:1] in (["paths"], ["darshanas"], ["all"]):
            printed[words[0]] = words[1:]
    expected = {
        row["off"]: [str(row["modules_off"]), f"{row['loss']:.4f}", f"{row['perplexity']:.2f}"]
        + ([f"{row['change']:+.2%}"] if row["off"] else [])
        for row in rows
    }
    assert printed == expected


def test_eval_ablate_names_the_choices_for_a_bad_value(capsys, saved):
    data = saved / "heldout.txt"
    code, _, err = run_cli(capsys, "eval", saved / "model", "--data", data, "--ablate", "layers")
    assert code == 2
    assert "families" in err and "modules" in err and "all" in err
