"""The translation head's own behaviour: prompts and labels, bad records, metrics, beam search, seed data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dharma_head_translation import Translation
from dharma_head_translation.metrics import translation_scores
from tiny import tiny_layout

from dharma_kernel.assemble import build_model
from dharma_kernel.data.tokenizer import train_tokenizer
from dharma_kernel.errors import DharmaError
from dharma_kernel.head_data import IGNORE, encode_records, read_head_records
from dharma_kernel.protocol import RecordError
from dharma_kernel.testing import perturb, tiny_backbone_config

SEED = Path(__file__).resolve().parents[5] / "shared" / "seed-data"
TEXTS = ["Sanskrit: धर्मक्षेत्रे कुरुक्षेत्रे", "English: on the field of dharma", "karma yoga and peace"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 5, vocab_size=300, min_frequency=1)


def head(**config) -> Translation:
    return Translation(32, Translation.Config(**config))


def test_the_loss_counts_the_target_and_its_end_only(tokenizer):
    encoded = head().encode({"source": "धर्मक्षेत्रे", "target": "on the field"}, tokenizer, 64)

    ids, labels = encoded["input_ids"], encoded["labels"]
    prompt = tokenizer("Sanskrit: धर्मक्षेत्रे", add_special_tokens=False)["input_ids"]
    prompt += tokenizer("\nEnglish:", add_special_tokens=False)["input_ids"]
    target = tokenizer(" on the field", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt + target
    assert labels == [IGNORE] * len(prompt) + target
    assert tokenizer.decode(ids) == "Sanskrit: धर्मक्षेत्रे\nEnglish: on the field<|endoftext|>"


def test_a_record_without_target_encodes_the_prompt_alone(tokenizer):
    encoded = head(source_language="English", target_language="Sanskrit").encode(
        {"source": "peace"}, tokenizer, 64
    )

    assert encoded.keys() == {"input_ids"}
    assert tokenizer.decode(encoded["input_ids"]) == "English: peace\nSanskrit:"


def test_a_long_source_is_cut_and_keeps_its_separator(tokenizer):
    encoded = head().encode({"source": "कुरुक्षेत्रे " * 40, "target": "field " * 40}, tokenizer, 48)

    prompt = [i for i, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label == IGNORE]
    assert len(prompt) == 24 and len(encoded["input_ids"]) == 48
    assert tokenizer.decode(prompt).endswith("\nEnglish:")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"source": "   ", "target": "peace"}, "empty 'source'"),
        ({"source": "शान्तिः", "target": " \n"}, "empty 'target'"),
        ({"source": "शान्तिः", "target": 3}, "'target' should be a string, not int"),
    ],
)
def test_unusable_records_are_refused(tokenizer, record, message):
    with pytest.raises(RecordError, match=message):
        head().encode(record, tokenizer, 64)


def test_an_empty_field_in_a_file_names_the_file_and_record(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"source": "धर्मः", "target": "duty"}\n\n{"source": "कर्म", "target": ""}\n')
    with pytest.raises(DharmaError, match=r"train\.jsonl: record 3: no 'target' field"):
        read_head_records(Translation, [path])

    path.write_text('{"source": "धर्मः", "target": "duty"}\n{"source": "  ", "target": "action"}\n')
    records = read_head_records(Translation, [path])
    with pytest.raises(DharmaError, match=r"train\.jsonl: record 2: empty 'source'"):
        encode_records(head(), records, tokenizer, 64)


def test_max_new_tokens_is_fitted_to_the_longest_target():
    records = [{"source": "धर्मः", "target": "duty"}, {"source": "कर्म", "target": "action and its fruit"}]

    assert Translation.fit_config(Translation.Config(), records).max_new_tokens == 21
    assert Translation.fit_config(Translation.Config(max_new_tokens=5), records).max_new_tokens == 5


def test_metrics_are_sacrebleu_chrf_and_bleu():
    perfect = translation_scores(["the field of dharma"], ["the field of dharma"])
    assert perfect == pytest.approx({"chrf": 100.0, "bleu": 100.0})

    scores = translation_scores(["the field of karma is here"], ["the field of dharma is here"])
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    assert round(scores["bleu"], 2) == 37.99  # precisions 5/6, 3/5, 1/4 and 0/3 (smoothed to 1/6)


def test_beam_search_with_the_module_cache_equals_it_without(tokenizer):
    layout = tiny_layout("routed", heads=[{"plugin": "translation", "config": {"max_new_tokens": 6}}])
    backbone = tiny_backbone_config(vocab_size=len(tokenizer), n_positions=128)
    model = build_model(backbone, layout, seed=0)
    perturb(model.stacks, seed=1, std=0.1)
    model.eval()
    translation = model.heads["translation"]
    record = {"source": "धर्मक्षेत्रे कुरुक्षेत्रे"}
    prompt = torch.tensor([translation.layout.prompt_ids(record["source"], tokenizer, 128)])

    for beams in (1, 4):
        with torch.no_grad():
            uncached = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, num_beams=beams,
                do_sample=False, use_cache=False, eos_token_id=0, pad_token_id=0,
            )  # fmt: skip
        expected = tokenizer.decode([t for t in uncached[0, prompt.shape[1] :].tolist() if t != 0]).strip()
        got = translation.predict(model, tokenizer, [{**record, "beams": beams}])[0]
        assert got == {"translation": expected, "beams": beams}
    assert expected  # an untrained model still says something


@pytest.mark.skipif(not SEED.is_dir(), reason=f"no seed data at {SEED}")
def test_seed_files_read_as_translation_records():
    gita = read_head_records(Translation, [SEED / "complete_scriptures" / "gita" / "bhagavad_gita.txt"])
    everything = read_head_records(Translation, [SEED])

    assert len(gita) == 496
    assert gita.records[0]["source"].startswith("धृतराष्ट्र उवाच धर्मक्षेत्रे")
    assert len(everything) == 619  # 618 distinct pairs: one is in two files
