"""The trained byte-level BPE and which tokenizer a manifest gets: round trips, offsets, sizes, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dharma_kernel.data import resolve_tokenizer, train_tokenizer
from dharma_kernel.errors import DharmaError
from dharma_kernel.manifest import load_manifest

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "corpus"

TEXTS = [
    "Karma is action, and the fruit of action follows the one who acts.",
    "धर्मक्षेत्रे कुरुक्षेत्रे समवेता युयुत्सवः । मामकाः पाण्डवाश्चैव किमकुर्वत सञ्जय ॥",
    "The ātman is not born and does not die; yoga is skill in action.",
    "Seva is service without thought of reward.\nBhakti is devotion.",
] * 4

# Text the tokenizer never saw, in scripts and spacing it never saw.
ROUND_TRIPS = [
    "धर्मक्षेत्रे कुरुक्षेत्रे",
    "ātman, Ātman, ṛta, jñāna, śānti",
    "two  spaces,   three,\tand a tab\n\nand blank lines\n",
    "  leading and trailing  ",
    "它 ☸ emoji 🙏 and CJK",
    "don't , split ' quotes . or dots",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_decoding_gives_back_exactly_what_was_encoded(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None  # byte-level: nothing is unknown


def test_end_of_text_is_eos_bos_and_pad_and_the_vocabulary_stays_within_its_size(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert 257 < len(tokenizer) <= 400
    assert tokenizer("karma")["input_ids"] == tokenizer("karma", add_special_tokens=False)["input_ids"]


def test_a_small_corpus_stops_the_vocabulary_early():
    assert len(train_tokenizer(["karma karma"], vocab_size=1000)) < 300


def test_offsets_are_the_characters_each_token_decodes_to(tokenizer):
    text = "Karma is action,\n  and yoga is skill."

    encoded = tokenizer(text, return_offsets_mapping=True)

    pieces = [text[start:end] for start, end in encoded["offset_mapping"]]
    assert pieces == [tokenizer.decode([token]) for token in encoded["input_ids"]]
    assert "".join(pieces) == text


def test_offsets_of_devanagari_cover_the_text_in_order(tokenizer):
    text = "कर्म karma"

    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]

    # A character of several bytes may be split between tokens: they share its span.
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(start < end for start, end in offsets)
    assert all(a[1] <= b[1] and a[0] <= b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    assert "".join(text[start:end] for start, end in offsets if start >= 4) == " karma"


def test_the_same_corpus_gives_the_same_vocabulary_in_another_process(tokenizer):
    script = (
        "import json, sys\n"
        "from dharma_kernel.data import train_tokenizer\n"
        "texts = json.loads(sys.stdin.read())\n"
        "print(train_tokenizer(texts, vocab_size=400).backend_tokenizer.to_str())\n"
    )
    env = {"RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "123", "PATH": ""}
    other = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(TEXTS),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout

    assert json.loads(other) == json.loads(tokenizer.backend_tokenizer.to_str())


def test_saved_and_loaded_it_gives_identical_ids(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)

    for text in ROUND_TRIPS:
        ids = tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids) == text
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (0, 0, 0)
    assert loaded.model_max_length == tokenizer.model_max_length


# --- which tokenizer a manifest gets ------------------------------------------------------------


def manifest(tmp_path: Path, backbone: str):
    path = tmp_path / "m.toml"
    path.write_text(f"[backbone]\n{backbone}\n", encoding="utf-8")
    return load_manifest(path)


FRESH = (
    'config = { architecture = "gpt2", n_layer = 1, n_embd = 8, n_head = 1, '
    "n_positions = 96, vocab_size = 500 }"
)


def corpus_texts() -> list[str]:
    return [path.read_text(encoding="utf-8") for path in sorted(CORPUS.glob("*.txt"))]


def test_a_fresh_backbone_gets_a_bpe_the_size_of_its_embeddings(tmp_path):
    tokenizer = resolve_tokenizer(manifest(tmp_path, FRESH), corpus_texts())

    assert len(tokenizer) == 500
    assert tokenizer.model_max_length == 96  # the backbone's n_positions


def test_a_trained_tokenizer_spec_sets_its_size_and_min_frequency(tmp_path):
    spec = f"{FRESH}\ntokenizer = {{ train = true, vocab_size = 300, min_frequency = 1 }}"

    tokenizer = resolve_tokenizer(manifest(tmp_path, spec), TEXTS)

    assert len(tokenizer) == 300
    assert tokenizer.decode(tokenizer("ātman")["input_ids"]) == "ātman"


def test_a_spec_larger_than_the_embeddings_says_what_to_set(tmp_path):
    spec = f"{FRESH}\ntokenizer = {{ train = true, vocab_size = 8000 }}"

    with pytest.raises(DharmaError) as caught:
        resolve_tokenizer(manifest(tmp_path, spec), TEXTS)

    assert (
        caught.value.message
        == "backbone.tokenizer.vocab_size: 8000 is more than the backbone's 500 embeddings"
    )
    assert caught.value.hint == (
        "Set backbone.tokenizer.vocab_size to at most 500, or the backbone's vocab_size to at least 8000."
    )


def test_a_named_tokenizer_is_loaded_and_checked_against_the_embeddings(tmp_path):
    train_tokenizer(corpus_texts(), vocab_size=600, min_frequency=1).save_pretrained(tmp_path / "big")
    train_tokenizer(TEXTS, vocab_size=300).save_pretrained(tmp_path / "small")

    small = resolve_tokenizer(manifest(tmp_path, f'{FRESH}\ntokenizer = "small"'), [])
    with pytest.raises(DharmaError) as caught:
        resolve_tokenizer(manifest(tmp_path, f'{FRESH}\ntokenizer = "big"'), [])

    assert small("karma")["input_ids"] == train_tokenizer(TEXTS, vocab_size=300)("karma")["input_ids"]
    assert caught.value.message == "the tokenizer has 600 tokens, more than the backbone's 500 embeddings"
    assert caught.value.hint.startswith("Set vocab_size = 600 in backbone.config, or train a tokenizer")


def test_a_pretrained_backbone_without_tokenizer_files_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=500).save_pretrained(tmp_path / "backbone")

    with pytest.raises(DharmaError, match=r"^backbone.pretrained: '\./backbone' has no tokenizer files"):
        resolve_tokenizer(manifest(tmp_path, 'pretrained = "./backbone"'), TEXTS)


def test_training_without_text_is_an_error(tmp_path):
    with pytest.raises(DharmaError, match="cannot train a tokenizer: there is no training text"):
        resolve_tokenizer(manifest(tmp_path, FRESH), [])


def test_a_named_directory_without_tokenizer_files_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=500).save_pretrained(tmp_path / "backbone")

    with pytest.raises(DharmaError, match=r"^backbone.tokenizer: '.*backbone' holds no tokenizer files"):
        resolve_tokenizer(manifest(tmp_path, f'{FRESH}\ntokenizer = "backbone"'), TEXTS)


def test_texts_fed_in_lists_give_the_vocabulary_fed_one_by_one(monkeypatch):
    from dharma_kernel.data import tokenizer as module

    texts = [path.read_text(encoding="utf-8") for path in sorted(CORPUS.rglob("*.txt"))] + TEXTS
    in_lists = train_tokenizer(texts, vocab_size=600).backend_tokenizer.to_str()
    monkeypatch.setattr(module, "_batches", lambda texts: iter(texts))  # the trainer's own one by one
    one_by_one = train_tokenizer(texts, vocab_size=600).backend_tokenizer.to_str()

    assert json.loads(in_lists) == json.loads(one_by_one)
    assert len(json.loads(in_lists)["model"]["vocab"]) == 600
