"""Packing records into rows: exact ids, LM labels at document boundaries, padding, concept labels per row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dharma_kernel.concepts import Lexicon, lexicons_for, token_labels
from dharma_kernel.data import PackedData, Record, pack, train_tokenizer
from dharma_kernel.errors import DharmaError

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "corpus"
X = -100


def word_tokenizer(words: list[str], pad: bool = True, bos: bool = False):
    """A word-level fast tokenizer: ``<|endoftext|>`` is 0, ``<pad>`` 1, ``<s>`` 2, then ``words`` from 3."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<pad>", "<s>", "<unk>", *words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<pad>" if pad else None,
        bos_token="<s>" if bos else None,
        unk_token="<unk>",
    )


WORDS = [f"w{n}" for n in range(1, 11)] + ["karma", "yoga"]  # w1 is 4 ... w10 is 13, karma 14, yoga 15


def ids(text: str) -> list[int]:
    return [WORDS.index(word) + 4 for word in text.split()]


def test_documents_end_with_eos_and_are_cut_into_rows_the_last_padded():
    tokenizer = word_tokenizer(WORDS)
    records = [Record("w1 w2 w3"), Record("w4 w5"), Record("w6 w7 w8 w9 w10")]

    packed = pack(records, tokenizer, max_length=4)

    assert ids("w1 w2 w3") == [4, 5, 6]
    assert packed.input_ids.tolist() == [
        [4, 5, 6, 0],
        [7, 8, 0, 9],
        [10, 11, 12, 13],
        [0, 1, 1, 1],
    ]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_labels_never_ask_for_a_documents_first_token_from_the_one_before():
    tokenizer = word_tokenizer(WORDS)
    records = [Record("w1 w2 w3"), Record("w4 w5"), Record("w6 w7 w8 w9 w10")]

    packed = pack(records, tokenizer, max_length=4)

    assert packed.labels.tolist() == [
        [4, 5, 6, 0],  # the EOS ending a document is trained
        [7, 8, 0, X],  # w6 starts a document after another's EOS
        [10, 11, 12, 13],
        [0, X, X, X],  # padding
    ]
    # Trained: w2 w3 EOS, w5 EOS, w8 w9 w10; the first column has nothing before it.
    assert packed.tokens == 8
    assert len(packed) == 4


def test_without_a_pad_token_eos_pads_and_a_distinct_bos_starts_each_document():
    tokenizer = word_tokenizer(WORDS, pad=False, bos=True)

    packed = pack([Record("w1 w2"), Record("w3")], tokenizer, max_length=4)

    assert packed.input_ids.tolist() == [[2, 4, 5, 0], [2, 6, 0, 0]]
    assert packed.labels.tolist() == [[2, 4, 5, 0], [2, 6, 0, X]]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_a_document_longer_than_a_row_continues_in_the_next():
    tokenizer = word_tokenizer(WORDS)

    packed = pack([Record("w1 w2 w3 w4 w5 w6 w7")], tokenizer, max_length=3)

    assert packed.input_ids.tolist() == [[4, 5, 6], [7, 8, 9], [10, 0, 1]]
    assert packed.labels.tolist() == [[4, 5, 6], [7, 8, 9], [10, 0, X]]
    assert packed.tokens == 5


def test_text_that_spells_the_end_of_text_token_is_not_a_document_end():
    tokenizer = train_tokenizer(["karma yoga <|endoftext|> seva"] * 4, vocab_size=300)
    text = "karma <|endoftext|> yoga"

    packed = pack([Record(text), Record("seva seva")], tokenizer, max_length=64)

    stream = packed.input_ids[0][packed.attention_mask[0] == 1].tolist()
    ends = [i for i, token in enumerate(stream) if token == tokenizer.eos_token_id]
    assert len(ends) == 2
    assert tokenizer.decode(stream[: ends[0]]) == text


def test_no_records_pack_into_no_rows():
    packed = pack([], word_tokenizer(WORDS), max_length=4, refs=["paths.karma"], lexicons=LEXICONS)

    assert packed.input_ids.shape == (0, 4)
    assert packed.concept_labels.shape == (0, 4, 1)
    assert packed.tokens == 0


def test_a_tokenizer_without_eos_is_refused():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>"
    )

    with pytest.raises(DharmaError, match="the tokenizer has no end-of-text"):
        pack([Record("w1")], tokenizer, max_length=4)


# --- concept labels -----------------------------------------------------------------------------

LEXICONS = {"paths.karma": Lexicon(["karma"]), "paths.yoga": Lexicon(["yoga"])}
REFS = ["paths.karma", "paths.yoga"]


def test_a_hit_labels_its_row_from_that_token_on_but_not_the_rows_after():
    tokenizer = word_tokenizer(WORDS)
    records = [Record("w1 karma w2 w3 w4 w5"), Record("w6 yoga", tags=("karma",))]

    packed = pack(records, tokenizer, max_length=4, refs=REFS, lexicons=LEXICONS)

    assert packed.input_ids.tolist() == [[4, 14, 5, 6], [7, 8, 0, 9], [15, 0, 1, 1]]
    karma = packed.concept_labels[..., 0].tolist()
    yoga = packed.concept_labels[..., 1].tolist()
    # row 0: "karma" is seen at token 1. row 1: the rest of that document cannot see it (0),
    # EOS is ignored, then "w6" of a record tagged karma (1). row 2: "yoga" tagged too, EOS, padding.
    assert karma == [[0, 1, 1, 1], [0, 0, X, 1], [1, X, X, X]]
    # "yoga" appears in row 2; "w6" before it, in row 1, is 0.
    assert yoga == [[0, 0, 0, 0], [0, 0, X, 0], [1, X, X, X]]
    assert packed.concept_labels.dtype == torch.int8
    assert packed.refs == tuple(REFS)


def test_concept_labels_equal_token_labels_of_each_piece_of_a_document_in_a_row():
    texts = [path.read_text(encoding="utf-8") for path in sorted(CORPUS.glob("*.txt"))]
    paragraphs = [
        p for name in ("paths.txt", "consciousness.txt") for p in (CORPUS / name).read_text().split("\n\n")
    ]
    records = [Record(p, ("seva",) if n % 7 == 0 else ()) for n, p in enumerate(paragraphs)]
    tokenizer = train_tokenizer(texts, vocab_size=600)
    refs = ["paths.karma", "paths.seva", "darshanas.vedanta", "consciousness.atman"]
    lexicons = lexicons_for(refs)
    length = 16

    packed = pack(records, tokenizer, max_length=length, refs=refs, lexicons=lexicons)

    flat = packed.concept_labels.view(-1, len(refs))
    position = 0
    for record in records:
        offsets = tokenizer(record.text, return_offsets_mapping=True)["offset_mapping"]
        cuts = sorted({0, len(offsets), *range(-position % length, len(offsets), length)})
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            expected = token_labels(record.text, offsets[a:b], lexicons, refs, record.tags)
            assert torch.equal(flat[position + a : position + b].float(), expected)
        assert (flat[position + len(offsets)] == X).all()  # EOS
        position += len(offsets) + 1
    assert (flat[position:] == X).all()  # padding
    assert (flat == 1).any(dim=0).all()  # every column has hits in this text


def test_a_batch_is_what_the_model_takes():
    from tiny import tiny_layout

    from dharma_kernel.assemble import build_model
    from dharma_kernel.testing import tiny_backbone_config

    model = build_model(tiny_backbone_config(vocab_size=300), tiny_layout())
    tokenizer = word_tokenizer(WORDS)
    records = [Record("w1 karma w2 w3 w4 w5 yoga w6"), Record("w7 w8 w9", tags=("dharma",))]
    packed = pack(records, tokenizer, max_length=6, refs=model.module_refs)

    batch = packed.batch([0, 2])
    output = model(**batch)

    assert set(batch) == {"input_ids", "attention_mask", "labels", "concept_labels"}
    assert batch["labels"].tolist() == packed.labels[[0, 2]].tolist()
    assert batch["concept_labels"].dtype == torch.float32 and batch["concept_labels"].shape == (2, 6, 2)
    assert torch.isfinite(output.loss)
    assert set(output.losses) >= {"lm", "concept"}
    assert isinstance(packed, PackedData) and packed.batch(slice(0, 2))["input_ids"].shape == (2, 6)


def test_ids_without_offsets_are_those_the_tokenizer_gives():
    # Without concept labels packing asks the Rust tokenizer for ids only (no offsets).
    from dharma_kernel.data.packing import _tokenize

    tokenizer = train_tokenizer(["karma yoga <|endoftext|> seva धर्म"] * 4, vocab_size=300)
    texts = ["karma <|endoftext|> yoga", "धर्म  seva\n\n\tkarma", "", "<|user|> hi"]
    tokenizer.backend_tokenizer.encode_special_tokens = False  # as a tokenizer starts out

    ids = _tokenize(tokenizer, texts, with_offsets=False)[0]

    assert tokenizer.backend_tokenizer.encode_special_tokens is False  # left as it was
    assert ids == tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert _tokenize(tokenizer, texts, with_offsets=True)[0] == ids
    assert tokenizer.eos_token_id not in ids[0]


@pytest.mark.parametrize("bos", [False, True])
def test_ids_given_end_to_end_pack_as_ids_given_text_by_text(bos):
    import numpy as np

    from dharma_kernel.data.fast_bpe import Flat
    from dharma_kernel.data.packing import TextStream

    tokenizer = word_tokenizer(WORDS, bos=bos)
    records = [Record("w1 w2 w3"), Record("w4"), Record("w5 w6 w7 w8 w9 w10 karma"), Record("yoga w1")]
    each = [ids(record.text) for record in records]
    flat = Flat(np.array([token for doc in each for token in doc]), np.array([len(doc) for doc in each]))
    by_text, end_to_end = TextStream(tokenizer, 4), TextStream(tokenizer, 4)
    for part in (slice(0, 1), slice(1, 4)):  # two calls: the second starts mid-row
        sub = Flat(flat.ids[sum(map(len, each[: part.start])) : sum(map(len, each[: part.stop]))],
                   flat.lengths[part])  # fmt: skip
        a, b = by_text.encode(records[part], (each[part], [])), end_to_end.encode(records[part], (sub, []))
        assert a.ids.tolist() == b.ids.tolist() and a.trained.tolist() == b.trained.tolist()
    assert (2 in a.ids.tolist()) == bos
