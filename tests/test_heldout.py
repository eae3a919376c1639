"""The bundled held-out text gives every standard module's concept enough labelled tokens for an AUC.

``dharma eval`` on ``examples/heldout`` measures each module's detection AUC from the
kernel's own labels; a module with too few positive (or negative) tokens there gets no
number. The text is packed as the foundation manifest packs it, with a BPE trained on
the training corpus as the demo trains one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dharma_kernel.catalogue import standard_refs
from dharma_kernel.concepts import lexicons_for
from dharma_kernel.data import clean_records, pack, read_records, train_tokenizer
from dharma_kernel.manifest import load_manifest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENOUGH = 20  # labelled tokens of each class a module's AUC should rest on at least


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(EXAMPLES / "foundation.toml")


@pytest.fixture(scope="module")
def heldout(manifest):
    return clean_records(read_records([manifest.resolve_path(p) for p in manifest.data.eval]))


@pytest.fixture(scope="module")
def training_text(manifest) -> str:
    return "\n".join(
        record.text for record in read_records([manifest.resolve_path(p) for p in manifest.data.train])
    )


def test_every_module_has_enough_positive_and_negative_tokens(manifest, heldout):
    corpus = clean_records(read_records([EXAMPLES / "data" / "corpus"]))
    tokenizer = train_tokenizer([record.text for record in corpus], manifest.backbone.tokenizer.vocab_size)
    packed = pack(heldout, tokenizer, manifest.data.max_length, refs=standard_refs())
    labels = packed.concept_labels
    positives = dict(zip(packed.refs, (labels == 1).sum((0, 1)).tolist(), strict=True))
    negatives = dict(zip(packed.refs, (labels == 0).sum((0, 1)).tolist(), strict=True))
    assert len(positives) == 37
    assert {ref: n for ref, n in positives.items() if n < ENOUGH} == {}
    assert {ref: n for ref, n in negatives.items() if n < ENOUGH} == {}


def test_each_concept_is_spread_over_paragraphs_and_some_paragraphs_have_none(heldout):
    lexicons = lexicons_for(standard_refs())
    found = {
        ref: [bool(lexicon.find(record.text)) for record in heldout] for ref, lexicon in lexicons.items()
    }
    assert {ref: sum(hits) for ref, hits in found.items() if sum(hits) < 4} == {}
    without_any = sum(not any(hits) for hits in zip(*found.values(), strict=True))
    assert without_any >= 10


def test_no_heldout_sentence_is_in_the_training_data(heldout, training_text):
    training = " ".join(training_text.split())
    sentences = [s for record in heldout for s in re.split(r"(?<=[.?!])\s+", " ".join(record.text.split()))]
    assert len(sentences) > 300
    assert [s for s in sentences if len(s) >= 40 and s in training] == []
