"""tiktoken's encoding of a GPT-2-shaped BPE: the same ids as the Rust tokenizer, or not used at all."""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from dharma_kernel.data import train_tokenizer
from dharma_kernel.data.fast_bpe import FastBPE, fast_encoder, gpt2_shape, reference_ids
from dharma_kernel.data.packing import _tokenize

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
SEED = ROOT.parent / "shared" / "seed-data"

pytest.importorskip("tiktoken")


def file_texts(directory: Path) -> list[str]:
    return [path.read_text(encoding="utf-8", errors="replace") for path in sorted(directory.rglob("*"))
            if path.is_file()]  # fmt: skip


def lines_of(texts: list[str]) -> list[str]:
    """Each text, its paragraphs and its lines: short and long inputs, with and without newlines."""
    return [piece for text in texts for piece in [text, *text.split("\n\n"), *text.splitlines()]]


def hf_encoded(tokenizer, texts: list[str]):
    """What packing asked of the tokenizer before tiktoken: ids and offsets, specials as text."""
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)


def assert_same_ids(tokenizer, texts: list[str]) -> None:
    """tiktoken's ids, and its offsets (when untrimmed), equal those the tokenizer gives through
    transformers."""
    encoder = fast_encoder(tokenizer)
    assert encoder is not None
    expected = hf_encoded(tokenizer, texts)
    fast = encoder.encode(texts)
    wrong = [text for text, a, b in zip(texts, fast, expected["input_ids"], strict=True) if a != b]
    assert not wrong, f"{len(wrong)} of {len(texts)} texts differ, e.g. {wrong[0][:200]!r}"
    # End to end too: stripped texts take the joined path (one string per thread, cut at newlines).
    stripped = [text.strip() for text in texts if text.strip()]
    expected_stripped = hf_encoded(tokenizer, stripped)["input_ids"]
    for some, ids in ((texts, expected["input_ids"]), (stripped, expected_stripped)):
        flat = encoder.encode_flat(some)
        assert flat.lengths.tolist() == [len(each) for each in ids]
        assert flat.ids.tolist() == [token for each in ids for token in each]
    if encoder.byte_lengths is None:  # trimmed offsets: the tokenizer gives them
        return
    ids, offsets = encoder.encode_with_offsets(texts)
    assert ids == fast
    spans = [[tuple(span) for span in each.tolist()] for each in offsets]
    wrong = [text for text, a, b in zip(texts, spans, expected["offset_mapping"], strict=True) if a != b]
    assert not wrong, f"offsets of {len(wrong)} of {len(texts)} texts differ, e.g. {wrong[0][:200]!r}"
    assert all(each.shape == (len(one), 2) for each, one in zip(offsets, ids, strict=True))


def test_ids_equal_the_tokenizers_on_the_examples():
    texts = file_texts(EXAMPLES)
    tokenizer = train_tokenizer(texts, vocab_size=3000)
    assert len(tokenizer) == 3000  # enough merges that most words are a token or two

    assert_same_ids(tokenizer, lines_of(texts))


@pytest.mark.skipif(not SEED.is_dir(), reason=f"no seed data at {SEED}")
def test_ids_equal_the_tokenizers_on_the_seed_data():
    texts = file_texts(SEED)
    tokenizer = train_tokenizer(texts, vocab_size=8000)

    assert_same_ids(tokenizer, [paragraph for text in texts for paragraph in text.split("\n\n")])


# fmt: off
PIECES = [
    *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    *".,;:!?-()[]{}\"'/\\@#$%^&*_+=<>|~`",
    *[chr(c) for c in range(0x0900, 0x0980)],  # Devanagari, its vowel signs and virama
    *"āīūṛṝḷṃḥṅñṭḍṇśṣ",  # IAST
    *[chr(c) for c in range(0x0300, 0x0370, 7)],  # combining marks
    "😀", "🙏", "🕉️", "👨‍👩‍👧", "🇮🇳", "\u200d", "\ufe0f",  # emoji, ZWJ sequences, flags, selectors
    "中文", "日本語", "한국어", "Ελληνικά", "русский", "العربية",
    "½", "²", "Ⅻ", "٣", "१२",  # numbers, Nd and not
    " ", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009", "\x0b", "\x0c",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", " 's", "''", "n't", "’s",
    "<|endoftext|>", "<|user|>", "<|", "|>", "karma", " yoga", "dharma", " धर्म", "123", " 4567",
]
# fmt: on


def fuzz(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 60))) for _ in range(count)]


def test_ids_equal_the_tokenizers_on_random_unicode():
    rng = random.Random(0)
    # Trained on the same mix, so merges span scripts, marks, emoji bytes and whitespace runs.
    tokenizer = train_tokenizer(fuzz(rng, 4000) + file_texts(EXAMPLES), vocab_size=4000)
    texts = fuzz(rng, 6000) + ["", " ", "\n", "<|endoftext|>", "a<|endoftext|>b", "it's  'S ok\t\n"]

    assert_same_ids(tokenizer, texts)
    ids = _tokenize(tokenizer, ["x<|endoftext|>y"], with_offsets=False)[0][0]
    assert tokenizer.eos_token_id not in ids  # text that spells a special token is text


def test_threads_give_the_ids_one_thread_gives():
    rng = random.Random(1)
    tokenizer = train_tokenizer(fuzz(rng, 500), vocab_size=600)
    encoding = fast_encoder(tokenizer).encoding
    # Lengths far apart, so the threads' equal shares of characters hold unequal numbers of texts.
    texts = fuzz(rng, 300) + ["karma yoga " * 2000] + fuzz(rng, 7) + [""] * 5

    one = FastBPE(encoding, threads=1).encode(texts)
    assert FastBPE(encoding, threads=2).encode(texts) == one
    assert FastBPE(encoding, threads=3).encode(texts) == one
    assert one == reference_ids(tokenizer.backend_tokenizer, texts)


def test_a_gpt2_tokenizer_from_vocab_and_merges_files_has_the_shape(tmp_path):
    # What a user's GPT-2 or distilgpt2 tokenizer looks like: vocab.json and merges.txt, loaded by
    # GPT2TokenizerFast (trimmed offsets, <|endoftext|> last); here from a vocabulary trained locally.
    from transformers import GPT2TokenizerFast

    trained = json.loads(train_tokenizer(file_texts(EXAMPLES), vocab_size=1000).backend_tokenizer.to_str())
    vocab = {token: index - 4 for token, index in trained["model"]["vocab"].items() if index >= 4}
    vocab["<|endoftext|>"] = len(vocab)
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in trained["model"]["merges"]]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = GPT2TokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert tokenizer.eos_token == "<|endoftext|>"

    assert gpt2_shape(tokenizer) is not None
    texts = lines_of(file_texts(EXAMPLES)) + ["a<|endoftext|>b"]
    assert_same_ids(tokenizer, texts)
    # GPT-2's offsets are trimmed (" karma" spans "karma"): those still come from the tokenizer.
    assert fast_encoder(tokenizer).byte_lengths is None
    ids, offsets = _tokenize(tokenizer, texts, with_offsets=True)
    assert offsets == hf_encoded(tokenizer, texts)["offset_mapping"]
    assert _tokenize(tokenizer, texts, with_offsets=False)[0] == tokenizer(
        texts, add_special_tokens=False, split_special_tokens=True
    )["input_ids"]


def byte_level_bpe(extra=None, merges=None, ids_reversed=False, **byte_level):
    """A byte-level BPE over the 256 bytes and ``merges`` (pairs, in order), GPT-2's split; the
    tokens merges make get ids in merge order (``ids_reversed``: the other way round)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0} | {char: 1 + n for n, char in enumerate(alphabet)}
    merges = merges or [("k", "a"), ("r", "m"), ("ka", "rm")]
    for left, right in merges[::-1] if ids_reversed else merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(**({"add_prefix_space": False} | byte_level))
    tokenizer.decoder = decoders.ByteLevel()
    if extra is not None:
        extra(tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def test_a_tokenizer_of_another_shape_is_encoded_by_itself(monkeypatch):
    from tokenizers import AddedToken, normalizers

    from dharma_kernel.data import fast_bpe

    texts = ["karma yoga", "karmakarma  ka rm", "<|endoftext|>karma"]
    assert fast_encoder(byte_level_bpe(), texts) is not None  # the shape, for contrast
    others = {
        "a prefix space": byte_level_bpe(add_prefix_space=True),
        "no regex split": byte_level_bpe(use_regex=False),
        "a normalizer": byte_level_bpe(lambda t: setattr(t, "normalizer", normalizers.NFKC())),
        "a non-special added token": byte_level_bpe(lambda t: t.add_tokens([AddedToken("yoga")])),
        "merges out of id order": byte_level_bpe(ids_reversed=True),
    }
    from test_data_packing import word_tokenizer

    others["a word-level tokenizer"] = word_tokenizer(["karma", "yoga"])
    for why, tokenizer in others.items():
        assert gpt2_shape(tokenizer) is None, why
        assert fast_encoder(tokenizer, texts) is None, why
        expected = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert _tokenize(tokenizer, texts, with_offsets=False)[0] == expected, why

    later = byte_level_bpe()  # decided, then given a token the split must honour: decided again
    assert fast_encoder(later, texts) is not None
    later.add_tokens(["yoga"])
    assert fast_encoder(later, texts) is None
    expected = later(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert _tokenize(later, texts, with_offsets=False)[0] == expected

    monkeypatch.setitem(sys.modules, "tiktoken", None)  # not installed: `import tiktoken` fails
    monkeypatch.setattr(fast_bpe, "_decided", type(fast_bpe._decided)())
    tokenizer = byte_level_bpe()
    assert fast_encoder(tokenizer, texts) is None
    expected = reference_ids(tokenizer.backend_tokenizer, texts)
    assert _tokenize(tokenizer, texts, with_offsets=False)[0] == expected


def test_the_guard_keeps_the_tokenizer_when_tiktoken_would_differ():
    # Merge order is id order, so the shape holds, but "bc" merges before "ab": the merges leave
    # "abc" as "a" "bc", while tiktoken takes a word that is a whole token ("abc") whole.
    tokenizer = byte_level_bpe(merges=[("b", "c"), ("a", "b"), ("ab", "c")])
    assert gpt2_shape(tokenizer) is not None
    texts = ["xyz", "abc abd", "ab"]
    assert reference_ids(tokenizer.backend_tokenizer, ["abc"])[0] != [tokenizer.convert_tokens_to_ids("abc")]

    with pytest.warns(UserWarning, match="tiktoken's ids differ"):
        assert fast_encoder(tokenizer, texts) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once: no second warning
        assert fast_encoder(tokenizer, texts) is None
        ids = _tokenize(tokenizer, texts, with_offsets=False)[0]
    assert ids == tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_ids_end_to_end_equal_text_by_text_and_the_joined_encoding_is_used():
    rng = random.Random(2)
    tokenizer = train_tokenizer(fuzz(rng, 2000) + file_texts(EXAMPLES), vocab_size=2000)
    encoding = fast_encoder(tokenizer).encoding
    stripped = [text.strip() for text in fuzz(rng, 3000) + lines_of(file_texts(EXAMPLES)) if text.strip()]
    # Texts a newline would join, and a lone surrogate tiktoken's buffer refuses: encoded one by one.
    edges = ["", " karma", "yoga ", "\nsat\n", "x"]
    surrogate = stripped[:50] + ["karma \ud800 yoga"] + stripped[50:100]
    for texts in (stripped, stripped[:500] + edges + stripped[500:900], surrogate, ["karma"], []):
        for threads in (1, 2, 3):
            encoder = FastBPE(encoding, threads=threads)
            each = encoder.encode(texts)
            flat = encoder.encode_flat(texts)
            assert flat.lengths.tolist() == [len(ids) for ids in each]
            assert flat.ids.tolist() == [token for ids in each for token in ids]
    # Stripped texts take the joined path: one string per share, cut at the newlines.
    encoder = FastBPE(encoding, threads=1)
    joined = np.array(encoding.encode_ordinary("\n".join(stripped)), dtype=np.int64)
    assert encoder._cut(joined, stripped) is not None
    assert encoder._cut(joined[:-1], stripped) is None  # a cut that does not add up is refused
    assert encoder._flat_share(stripped[:2] + [" x"]).lengths.tolist() == [len(ids) for ids in encoder.encode(
        stripped[:2] + [" x"])]  # fmt: skip


def test_a_tiktoken_whose_buffer_allows_specials_is_not_trusted_with_them():
    # tiktoken 0.9 and 0.10 gave encode_to_numpy every special whatever allowed_special said: the
    # buffer is then not used, and text that spells a special token stays text.
    from dharma_kernel.data.fast_bpe import _buffer_is_ordinary

    tokenizer = train_tokenizer(file_texts(EXAMPLES), vocab_size=1000)
    encoding = fast_encoder(tokenizer).encoding
    assert _buffer_is_ordinary(encoding)
    honest = encoding.encode_to_numpy

    def allowing_all(text, *, allowed_special=set(), disallowed_special="all"):  # noqa: B006
        return honest(text, allowed_special="all", disallowed_special=())

    encoding.encode_to_numpy = allowing_all
    assert not _buffer_is_ordinary(encoding)
    texts = ["karma<|endoftext|>yoga", "seva <|user|> bhakti", "dharma"]
    flat = FastBPE(encoding, threads=1).encode_flat(texts)
    assert flat.ids.tolist() == [token for ids in FastBPE(encoding, threads=1).encode(texts) for token in ids]
    assert tokenizer.eos_token_id not in flat.ids.tolist()
