"""Prediction over long contexts: every window scored, the best span given in the context's characters."""

import pytest
import torch
from dharma_head_qa.features import char_span
from dharma_head_qa.spans import best_span

from dharma_kernel.assemble import build_model
from dharma_kernel.data.tokenizer import train_tokenizer
from dharma_kernel.testing import tiny_backbone_config

SENTENCES = [
    "Krishna taught Arjuna on the field of Kurukshetra.",
    "Vyāsa lived on an island in the Yamunā and composed the Mahābhārata.",
    "धर्मक्षेत्रे कुरुक्षेत्रे समवेता युयुत्सवः ।",
]
LONG = " ".join(SENTENCES * 3)
SHORT = SENTENCES[1]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = train_tokenizer(SENTENCES * 4 + ["Who taught Arjuna? Where did Vyāsa live?"], vocab_size=300)
    backbone = tiny_backbone_config(vocab_size=len(tokenizer), n_positions=48)
    model = build_model(backbone, {"heads": [{"plugin": "qa", "config": {"stride": 8}}]}).eval()
    return model, tokenizer


def predict(model, tokenizer, records):
    with torch.no_grad():
        return model.heads["qa"].predict(model, tokenizer, records)


def test_a_long_context_is_read_in_windows_and_answered_in_its_own_characters(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    head = model.heads["qa"]
    record = {"question": "Who taught Arjuna?", "context": LONG}
    windows = head._windows(record, tokenizer, 48, train=False)
    assert len(windows) > 3  # the backbone's 48 positions cap max_length
    [prediction] = predict(model, tokenizer, [record])
    start, end = prediction["start"], prediction["end"]
    assert 0 <= start < end <= len(LONG) and LONG[start:end] == prediction["answer"]
    assert prediction["answer"] == prediction["answer"].strip() and 0 < prediction["score"] <= 1
    # each window alone through the model: the answer is the best span of the best-scoring window
    scored = []
    for window in windows:
        ids = torch.tensor([window.input_ids])
        mask = torch.tensor([window.context_mask])
        with torch.no_grad():
            logits = model(input_ids=ids, head_labels={"qa": {"context_mask": mask}}, use_cache=False)
        logits = logits.heads["qa"].logits
        span = best_span(logits["start"][0], logits["end"][0], mask[0], head.config.max_answer_tokens)
        scored.append((span.score, char_span(LONG, window.offsets, span.first, span.last)))
    score, (first, last) = max(scored)
    assert prediction["score"] == pytest.approx(score, rel=1e-4) and (start, end) == (first, last)


@pytest.mark.parametrize("per_forward", [32, 2])
def test_batching_records_together_changes_no_prediction(model_and_tokenizer, monkeypatch, per_forward):
    monkeypatch.setattr("dharma_head_qa.head.WINDOWS_PER_FORWARD", per_forward)
    model, tokenizer = model_and_tokenizer
    records = [
        {"question": "Who taught Arjuna?", "context": LONG},
        {"question": "Where did Vyāsa live?", "context": SHORT},
        {"question": "कौन?", "context": SENTENCES[2]},
    ]
    together = predict(model, tokenizer, records)
    alone = [predict(model, tokenizer, [record])[0] for record in records]
    assert [p["answer"] for p in together] == [p["answer"] for p in alone]
    assert [(p["start"], p["end"]) for p in together] == [(p["start"], p["end"]) for p in alone]
    for a, b in zip(together, alone, strict=True):
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)
