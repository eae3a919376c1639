"""Token ids of a GPT-2-shaped byte-level BPE from tiktoken: the Rust tokenizer's ids, 4-5x faster.

    encoder = fast_encoder(tokenizer, sample=texts[:100])   # None: use the tokenizer itself
    ids = encoder.encode(texts) if encoder else ...

tiktoken encodes a byte-level BPE by ranks of tokens instead of a list of merges: of
two neighbouring pieces, the pair whose joined bytes form the token of lowest id
merges first. That is the Hugging Face BPE's rule exactly when the tokenizer has
GPT-2's shape (:func:`gpt2_shape` checks it): byte-level pre-tokenization with
GPT-2's regex and no prefix space, no normalizer, every added token special, all 256
bytes in the vocabulary, and merges whose order is their tokens' id order (each merge
``(a, b)`` makes the token ``a + b``, ids strictly increasing down the list, every
token longer than a byte made by exactly one merge). Tokenizers trained by
:func:`~dharma_kernel.data.tokenizer.train_tokenizer` have that shape, and so has GPT-2's.

Two cases the shape cannot rule out: a word (a piece of the regex's split) that is a
whole token but that the merges would split, which tiktoken keeps whole; and two
pieces that join into a token through a split other than the merge that made it,
which tiktoken joins. tiktoken's authors expect neither in a BPE trained the usual
way, and the tests find none (tests/test_data_fast_bpe.py: the examples, the seed
data, random Unicode, a GPT-2-format tokenizer), but that is evidence, not proof, so
:func:`fast_encoder` also encodes a sample both ways and keeps the tokenizer itself
(with a warning) on any difference. A difference only in text past the sample would
go unseen.

Text that spells a special token (``<|endoftext|>``) is tokenized as text, as packing
wants (``encode_ordinary``). tiktoken releases the GIL while it encodes, so
:meth:`FastBPE.encode` spreads a batch over every core from threads.
"""

from __future__ import annotations

import json
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from itertools import chain
from typing import Any, TypeVar

import numpy as np

__all__ = ["GPT2_PATTERN", "FastBPE", "Flat", "fast_encoder", "gpt2_shape"]

# The split of the Rust tokenizer's ByteLevel pre-tokenizer (use_regex), in tiktoken's syntax.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SAMPLE_CHARS = 1_000_000  # the guard encodes about this much of the first texts both ways
SEPARATOR = "\n"  # between the texts :meth:`FastBPE.encode_flat` encodes as one

T = TypeVar("T")
# Each tokenizer's encoder (or None), with its length when decided.
_decided: weakref.WeakKeyDictionary[Any, tuple[int, FastBPE | None]] = weakref.WeakKeyDictionary()


@dataclass
class Flat:
    """The ids of several texts end to end, ``ids [N]`` (an integer array), and each text's count,
    ``lengths``."""

    ids: np.ndarray
    lengths: np.ndarray


class FastBPE:
    """A tiktoken encoding that gives a tokenizer's ids (see :func:`fast_encoder`), and its
    character offsets when ``byte_lengths`` (each token's length in bytes, by id) is given."""

    def __init__(self, encoding: Any, byte_lengths: np.ndarray | None = None, threads: int | None = None):
        self.encoding = encoding
        self.byte_lengths = byte_lengths
        self.threads = threads or os.cpu_count() or 1
        self._pool: ThreadPoolExecutor | None = None
        self._token_bytes: np.ndarray | None = byte_lengths
        self._newline: int = encoding.encode_ordinary(SEPARATOR)[0]
        self._buffer = _buffer_is_ordinary(encoding)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, no special tokens added or recognised; slices of the batch run on threads."""
        one = self.encoding.encode_ordinary
        return self._on_threads(lambda part: [one(text) for text in part], texts)

    def encode_flat(self, texts: Sequence[str]) -> Flat:
        """:meth:`encode`'s ids end to end, without a Python list per text.

        Each thread encodes its share as one string, the texts joined by newlines, so it takes
        the GIL back once per share rather than once per text (with thousands of short texts,
        threads that wait for the GIL leave cores idle). A newline between two texts that
        neither start nor end with whitespace is a piece of GPT-2's split on its own and changes
        neither text's pieces; the ids are cut at the newlines' byte positions, and a share
        where any text does not allow it, or the cut does not find each newline there as its
        own token, is encoded text by text instead.
        """
        shares = self._on_threads(lambda part: [self._flat_share(part)], texts)
        if len(shares) == 1:
            return shares[0]
        return Flat(np.concatenate([s.ids for s in shares]), np.concatenate([s.lengths for s in shares]))

    def _flat_share(self, texts: Sequence[str]) -> Flat:
        if len(texts) > 1 and not any(_spaced_edge(text) for text in texts):
            try:
                cut = self._cut(self._array(SEPARATOR.join(texts)), texts)
            except UnicodeEncodeError:  # a lone surrogate: encode_ordinary's own repair, text by text
                cut = None
            if cut is not None:
                return cut
        each = [self.encoding.encode_ordinary(text) for text in texts]
        lengths = np.fromiter(map(len, each), np.int64, len(each))
        return Flat(np.fromiter(chain.from_iterable(each), np.int64, int(lengths.sum())), lengths)

    def _cut(self, ids: np.ndarray, texts: Sequence[str]) -> Flat | None:
        """The ids of ``SEPARATOR.join(texts)`` cut into the texts', or None where a separator is
        not a token of its own at its byte position."""
        sizes = np.fromiter((_utf8_size(text) for text in texts), np.int64, len(texts))
        separators = np.cumsum(sizes + 1)[:-1] - 1  # byte offset of each newline
        ends = np.cumsum(self._bytes_of()[ids])  # byte offset after each token
        if not len(ends) or ends[-1] != separators[-1] + 1 + sizes[-1]:
            return None
        before = np.searchsorted(ends, separators)  # the token that ends where a newline starts
        if before[-1] + 1 >= len(ids) or not (ends[before] == separators).all():
            return None
        newline = before + 1
        if not (ids[newline] == self._newline).all():
            return None
        keep = np.ones(len(ids), dtype=bool)
        keep[newline] = False
        bounds = np.concatenate([[0], newline, [len(ids)]])
        lengths = np.diff(bounds) - np.concatenate([[0], np.ones(len(newline), dtype=np.int64)])
        return Flat(ids[keep], lengths)

    def _array(self, text: str) -> np.ndarray:
        """``encode_ordinary(text)`` as an array: tiktoken's own buffer where it gives the same (see
        :func:`_buffer_is_ordinary`), which spares a Python int per token; else the list, converted."""
        if self._buffer:
            return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return np.array(self.encoding.encode_ordinary(text), dtype=np.int64)

    def _bytes_of(self) -> np.ndarray:
        """Each token's length in bytes, by id (0 for ids tiktoken does not know)."""
        if self._token_bytes is None:
            size = self.encoding.max_token_value + 1
            lengths = np.zeros(size, dtype=np.int64)
            for index in range(size):
                try:
                    lengths[index] = len(self.encoding.decode_single_token_bytes(index))
                except KeyError:
                    pass
            self._token_bytes = lengths
        return self._token_bytes

    def encode_with_offsets(self, texts: Sequence[str]) -> tuple[list[list[int]], list[np.ndarray]]:
        """Ids of each text and each token's ``[start, end)`` character span, ``[T, 2]``, as the
        Rust tokenizer gives them untrimmed: a token that holds part of a character spans all of it."""
        if self.byte_lengths is None:
            raise ValueError("this encoder was made without byte lengths, so it gives no offsets")
        one = self.encoding.encode_ordinary

        def part(texts: Sequence[str]) -> list[tuple[list[int], np.ndarray]]:
            return [(ids, self._spans(text, ids)) for text in texts for ids in [one(text)]]

        both = self._on_threads(part, texts)
        return [ids for ids, _ in both], [spans for _, spans in both]

    def _spans(self, text: str, ids: list[int]) -> np.ndarray:
        lengths = self.byte_lengths[np.array(ids, dtype=np.int64)]  # type: ignore[index]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        if not text.isascii():  # byte positions to characters: count the bytes that start one
            raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
            character = np.cumsum((raw & 0xC0) != 0x80) - 1
            starts, ends = character[starts], character[ends - 1] + 1
        return np.stack([starts, ends], axis=1)

    def _on_threads(self, work: Callable[[Sequence[str]], list[T]], texts: Sequence[str]) -> list[T]:
        if self.threads == 1 or len(texts) < 2 * self.threads:
            return work(texts)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dharma-bpe")
        # Equal shares of characters, not of texts, so no thread waits on one with the long documents.
        bounds = _shares([len(text) for text in texts], self.threads)
        slices = [texts[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return [each for part in self._pool.map(work, slices) for each in part]


def fast_encoder(tokenizer: Any, sample: Sequence[str] = ()) -> FastBPE | None:
    """A :class:`FastBPE` for ``tokenizer`` when it has GPT-2's shape and tiktoken is installed,
    else None (encode with the tokenizer).

    The first call for a tokenizer decides, and later ones reuse the decision (until tokens
    are added to it): the texts of ``sample`` (up to :data:`SAMPLE_CHARS` characters) are
    encoded both ways, and on any difference a warning is given and None returned.
    """
    try:
        size, decided = _decided[tokenizer]
        if size == len(tokenizer):  # else tokens were added since: decide again
            return decided
    except (KeyError, TypeError):
        pass
    encoder = _build(tokenizer)
    if encoder is not None and not _agrees(encoder, tokenizer, sample):
        warnings.warn(
            "tiktoken's ids differ from the tokenizer's on the first texts; tokenizing with the "
            "tokenizer itself (slower, same result)",
            stacklevel=2,
        )
        encoder = None
    try:
        _decided[tokenizer] = (len(tokenizer), encoder)
    except TypeError:  # not weakly referenceable: decided again next time
        pass
    return encoder


@dataclass
class Shape:
    """What tiktoken needs of a GPT-2-shaped BPE: ``ranks`` (each token's bytes to its id, specials
    aside), ``specials`` (content to id), and whether its offsets are ``untrimmed`` (no
    post-processor, or ByteLevel's with ``trim_offsets = false``, as trained tokenizers have)."""

    ranks: dict[bytes, int]
    specials: dict[str, int]
    untrimmed: bool


def gpt2_shape(tokenizer: Any) -> Shape | None:
    """The :class:`Shape` of ``tokenizer`` when it is a Rust-backed byte-level BPE of GPT-2's shape
    (see the module's doc), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None or not _byte_level_split(spec.get("pre_tokenizer")):
        return None
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    added = spec.get("added_tokens") or []
    if not all(token.get("special") for token in added):
        return None  # a non-special added token is split out of the text before the BPE runs
    specials = {token["content"]: token["id"] for token in added}
    vocab: dict[str, int] = model.get("vocab") or {}
    to_byte = _byte_of_char()
    if not set(to_byte) <= set(vocab):
        return None  # a byte missing from the vocabulary is an unknown token
    special_ids = set(specials.values())
    ranks: dict[bytes, int] = {}
    for token, index in vocab.items():
        if index in special_ids:
            continue
        if any(char not in to_byte for char in token):
            return None
        ranks[bytes(to_byte[char] for char in token)] = index
    if not _merge_order_is_id_order(model.get("merges") or [], vocab, special_ids):
        return None
    post = spec.get("post_processor")
    untrimmed = post is None or (post.get("type") == "ByteLevel" and not post.get("trim_offsets", True))
    return Shape(ranks, specials, untrimmed)


def _byte_level_split(pre: dict[str, Any] | None) -> bool:
    """Whether the pre-tokenizer is ByteLevel with GPT-2's regex and no prefix space (alone or
    as the only member of a Sequence)."""
    if pre is not None and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return (
        pre is not None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space")
        and pre.get("use_regex", True)
    )


def _merge_order_is_id_order(merges: list[Any], vocab: dict[str, int], special_ids: set[int]) -> bool:
    """Each merge ``(a, b)`` makes the token ``a + b``; ids strictly increase down the list; every
    token longer than a byte (specials aside) is made by one merge."""
    last = -1
    made = 0
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        index = vocab.get(left + right)
        if left not in vocab or right not in vocab or index is None or index <= last:
            return False
        last = index
        made += 1
    longer = sum(1 for token, index in vocab.items() if len(token) > 1 and index not in special_ids)
    return made == longer  # strictly increasing ids: no token made twice, so all of them made


def _build(tokenizer: Any) -> FastBPE | None:
    try:
        import tiktoken
    except ImportError:
        return None
    shape = gpt2_shape(tokenizer)
    if shape is None:
        return None
    encoding = tiktoken.Encoding("dharma-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=shape.ranks,
                                 special_tokens=shape.specials)  # fmt: skip
    if not shape.untrimmed:
        return FastBPE(encoding)
    lengths = np.zeros(max([*shape.ranks.values(), *shape.specials.values()]) + 1, dtype=np.int64)
    for token, index in shape.ranks.items():
        lengths[index] = len(token)
    for content, index in shape.specials.items():
        lengths[index] = len(content.encode("utf-8"))
    return FastBPE(encoding, lengths)


def _agrees(encoder: FastBPE, tokenizer: Any, sample: Sequence[str]) -> bool:
    """Whether ``encoder`` gives the tokenizer's ids (and offsets, when it gives any) on the first
    :data:`SAMPLE_CHARS` characters of ``sample``."""
    texts, size = [], 0
    for text in sample:
        if size >= SAMPLE_CHARS:
            break
        texts.append(text)
        size += len(text)
    backend = tokenizer.backend_tokenizer
    if encoder.byte_lengths is None:
        ids = reference_ids(backend, texts)
        return encoder.encode(texts) == ids and _flat_agrees(encoder, texts, ids)
    with _as_text(backend):
        expected = backend.encode_batch(texts, add_special_tokens=False)
    ids, offsets = encoder.encode_with_offsets(texts)
    return (
        ids == [each.ids for each in expected]
        and all(
            spans.tolist() == [list(span) for span in each.offsets]
            for spans, each in zip(offsets, expected, strict=True)
        )
        and _flat_agrees(encoder, texts, ids)
    )


def _flat_agrees(encoder: FastBPE, texts: Sequence[str], ids: list[list[int]]) -> bool:
    flat = encoder.encode_flat(texts)
    return flat.lengths.tolist() == [len(each) for each in ids] and flat.ids.tolist() == [
        token for each in ids for token in each
    ]


def reference_ids(backend: Any, texts: Sequence[str]) -> list[list[int]]:
    """What ``tokenizer(texts, split_special_tokens=True)`` gives as ``input_ids``, from the Rust
    tokenizer's ``encode_batch_fast``, which computes no offsets and skips transformers' conversion
    of each encoding."""
    with _as_text(backend):
        return [encoding.ids for encoding in backend.encode_batch_fast(list(texts), add_special_tokens=False)]


@contextmanager
def _as_text(backend: Any) -> Iterator[None]:
    """Text that spells a special token is tokenized as text, within the block."""
    splitting = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        yield
    finally:
        backend.encode_special_tokens = splitting


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's table from the printable characters byte-level tokens are spelt in to the bytes."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = ByteLevel.alphabet()
    # The alphabet is the 256 characters; the bytes they stand for are GPT-2's fixed assignment:
    # printable Latin-1 bytes stand for themselves, the 68 others for 256, 257, ... in byte order.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [byte for byte in range(256) if byte not in set(kept)]
    table = {chr(byte): byte for byte in kept} | {chr(256 + n): byte for n, byte in enumerate(moved)}
    if set(table) != set(chars):
        raise AssertionError("the Rust tokenizer's byte-level alphabet is not GPT-2's")
    return table


def _shares(lengths: list[int], parts: int) -> list[int]:
    """``parts + 1`` cut points that give each of ``parts`` contiguous slices about the same total."""
    total = sum(lengths)
    cuts, running, part = [0], 0, 1
    for index, length in enumerate(lengths):
        running += length
        while part < parts and running >= total * part / parts:
            cuts.append(index + 1)
            part += 1
    cuts += [len(lengths)] * (parts + 1 - len(cuts))
    return cuts


def _spaced_edge(text: str) -> bool:
    """Whether ``text`` starts or ends with whitespace (``str.isspace`` holds for every character
    the split's ``\\s`` matches), or is empty."""
    return not text or text[0].isspace() or text[-1].isspace()


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _buffer_is_ordinary(encoding: Any) -> bool:
    """Whether ``encode_to_numpy`` with no special allowed gives ``encode_ordinary``'s ids: it needs a
    special token registered (without one, tiktoken's ``encode`` tries a match at every character)
    and a tiktoken that honours ``allowed_special`` there (0.11 on; 0.9 and 0.10 allowed them all,
    and before 0.9 there is no such method). Checked on each special's own text."""
    specials = sorted(encoding.special_tokens_set)
    if not specials or not hasattr(encoding, "encode_to_numpy"):
        return False
    return all(
        encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).tolist()
        == encoding.encode_ordinary(text)
        for text in specials
    )
