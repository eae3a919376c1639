"""A Dharma model trains under transformers' own ``Trainer``, so users can bring their own loop."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_layout
from trainkit import SENTENCES

from dharma_kernel.assemble import build_model
from dharma_kernel.testing import tiny_backbone_config

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the dev extra)")
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from dharma_kernel.model import DharmaModel  # noqa: E402

LENGTH, VOCAB = 32, 97
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def model(composition: str = "routed", top_k: int = 1, **backbone: float) -> DharmaModel:
    """2-layer GPT-2 (vocab 97) with paths.dharma and darshanas.vedanta after both blocks."""
    config = tiny_backbone_config(vocab_size=VOCAB, **backbone)
    return build_model(config, tiny_layout(composition, top_k), seed=0)


def rows(padded: int = 0) -> list[dict[str, torch.Tensor]]:
    """The test corpus as characters (ids 1..96), one sentence a row of LENGTH tokens.

    The last ``padded`` rows keep only their first half: the rest is padding (mask 0, label -100).
    concept_labels: one per module (dharma, vedanta), whether the sentence speaks of it.
    """
    out = []
    for i, sentence in enumerate(SENTENCES):
        ids = torch.tensor([ord(c) % (VOCAB - 1) + 1 for c in sentence[:LENGTH]])
        mask = torch.ones(LENGTH, dtype=torch.long)
        labels = ids.clone()
        if i >= len(SENTENCES) - padded:
            mask[LENGTH // 2 :] = 0
            labels[LENGTH // 2 :] = -100
            ids = ids.masked_fill(mask == 0, 0)
        lower = sentence.lower()
        concepts = torch.tensor(
            [float("dharma" in lower or "karma" in lower), float("vedanta" in lower or "brahman" in lower)]
        )
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "concept_labels": concepts})
    return out


def stacked(data: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in data]) for key in data[0]}


def losses(model: DharmaModel, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    return {"total": float(out.loss), "lm": float(out.losses["lm"]), "concept": float(out.losses["concept"])}


def arguments(folder, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(folder),
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(**settings)


def test_trainer_trains_modules_and_saves_a_loadable_model(tmp_path):
    data = rows(padded=3)
    batch = stacked(data)
    m = model()
    before = losses(m, batch)
    modules_before = {name: p.detach().clone() for name, p in m.stacks.named_parameters()}

    # Trainer's default label_names are every forward argument named *label* (labels, concept_labels,
    # head_labels) and evaluation computes a loss only when all are in the batch: name the LM labels.
    args = arguments(
        tmp_path / "out", max_steps=20, label_names=["labels"], per_device_eval_batch_size=len(data)
    )
    trainer = Trainer(model=m, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()

    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 20 and all(math.isfinite(x) for x in logged)
    assert sum(logged[-5:]) / 5 < logged[0] - 1.0, logged
    after = losses(m, batch)
    assert before["lm"] > math.log(VOCAB) - 0.3  # untrained: about uniform over the vocabulary
    assert after["lm"] < before["lm"] - 1.0, (before, after)
    assert after["concept"] < before["concept"], (before, after)
    unchanged = [n for n, p in m.stacks.named_parameters() if torch.equal(p.detach(), modules_before[n])]
    assert not unchanged, f"module parameters the Trainer never updated: {unchanged}"
    assert trainer.evaluate()["eval_loss"] == pytest.approx(after["total"], abs=1e-5)

    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    assert (saved / "model.safetensors").is_file() and (saved / "config.json").is_file()
    assert not list(saved.glob("pytorch_model*.bin"))
    with torch.no_grad():
        reference = m.eval()(**batch, use_cache=False)
    for cls in (DharmaModel, AutoModelForCausalLM):
        loaded = cls.from_pretrained(saved).eval()
        assert isinstance(loaded, DharmaModel)
        state = loaded.state_dict()
        for name, tensor in m.state_dict().items():
            assert torch.equal(state[name], tensor), name
        with torch.no_grad():
            out = loaded(**batch, use_cache=False)
        torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)
        torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=0)


def test_gradient_accumulation_steps_like_one_batch(tmp_path):
    """4 rows x 2 accumulated equal 8 rows at once: the Trainer must average the two micro-batch losses.

    Plain SGD without clipping, so a gradient twice too large would move the weights twice as far.
    """
    data = rows()[:8]
    results = []
    for size, accum in ((8, 1), (4, 2)):
        m = model("sequential", **NO_DROPOUT)
        args = arguments(tmp_path / f"out{accum}", max_steps=1, per_device_train_batch_size=size,
                         gradient_accumulation_steps=accum, optim="sgd", learning_rate=0.5,
                         max_grad_norm=0.0, lr_scheduler_type="constant")  # fmt: skip
        trainer = Trainer(model=m, args=args, train_dataset=data)
        trainer.train()
        logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
        results.append((logged, dict(m.named_parameters())))
    (loss_one, params_one), (loss_two, params_two) = results
    expected = losses(model("sequential", **NO_DROPOUT), stacked(data))["total"]
    assert loss_one == pytest.approx(expected, abs=1e-5)
    assert loss_two == pytest.approx(expected, abs=1e-5)
    for name, param in params_one.items():
        torch.testing.assert_close(params_two[name], param, rtol=0, atol=1e-6, msg=name)


def test_mixed_precision_and_predict_rebuild_the_module_score_mappings(tmp_path):
    """accelerate (bf16/fp16) and Trainer.predict copy every mapping in an output as
    ``type(mapping)({...})``: the model's per-module scores must survive that."""
    from accelerate.utils.operations import convert_to_fp32
    from transformers.trainer_pt_utils import nested_detach

    data = rows()
    m = model()
    with torch.no_grad():
        out = m(**stacked(data[:2]), use_cache=False)
    for copy in (convert_to_fp32(out), nested_detach(out)):
        assert list(copy.module_scores) == m.module_refs
        for ref in m.module_refs:
            torch.testing.assert_close(copy.module_scores[ref], out.module_scores[ref].float())
            assert torch.equal(copy.module_active[ref], out.module_active[ref])

    args = arguments(tmp_path / "out", max_steps=1, bf16=True, label_names=["labels"])
    trainer = Trainer(model=m, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    predicted = trainer.predict(data[:4])
    assert predicted.predictions is not None
