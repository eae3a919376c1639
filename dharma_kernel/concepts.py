"""Concept labels: where a module's lexicon and a record's tags say its concept is present.

A module's ``concepts`` (Devanagari, IAST and English terms) become a :class:`Lexicon`;
:func:`token_labels` turns lexicon hits and record tags into per-token labels that
the ``concept`` loss trains each module's activation score against, and
:func:`label_batch` does it for a tokenized batch.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .padding import pad_id

IGNORE = -100
_DEVANAGARI = re.compile(r"[\u0900-\u097F\uA8E0-\uA8FF]")
# Plural/inflection endings a Latin-script term may carry: "karmas", "deeds", "duties".
_SUFFIX = r"(?:e?s)?"


def _is_devanagari(term: str) -> bool:
    return bool(_DEVANAGARI.search(term))


def _fold(text: str) -> str:
    """ASCII-fold Latin script: "ātman" -> "atman", "ṛta" -> "rta"."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))


@functools.lru_cache(maxsize=4096)
def _view(text: str, fold: bool) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """``text`` NFC-normalised (and folded), with each view character's span in ``text``.

    Normalisation can merge or drop characters, so hits are found in the view and
    mapped back through ``starts``/``ends`` to the caller's character offsets.
    Cached: every module's lexicon looks at the same texts.
    """
    if text.isascii():
        return text, tuple(range(len(text))), tuple(range(1, len(text) + 1))
    chars: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    i = 0
    while i < len(text):
        j = i + 1
        while j < len(text) and unicodedata.combining(text[j]):
            j += 1  # a base character and its combining marks normalise together
        cluster = unicodedata.normalize("NFC", text[i:j])
        form = _fold(cluster) if fold else cluster
        chars.extend(form)
        starts.extend([i] * len(form))
        ends.extend([j] * len(form))
        i = j
    return "".join(chars), tuple(starts), tuple(ends)


def _pattern(term: str) -> re.Pattern[str]:
    words = re.split(r"\s+", unicodedata.normalize("NFC", term).strip())
    if _is_devanagari(term):
        # Sanskrit inflects and compounds: कर्म sits inside कर्मण्येवाधिकारस्ते.
        return re.compile(r"\s+".join(map(re.escape, words)))
    words = [re.escape(_fold(w)).replace("'", "['’]") for w in words]
    last = words[-1]
    if re.search(r"[^aeiou]y$", last):
        last = last[:-1] + r"(?:y|ies)"  # duty -> duties
    body = r"\s+".join([*words[:-1], last + _SUFFIX])
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


class Lexicon:
    """The terms of one concept and where they occur in text.

    Matching is case-insensitive on NFC-normalised text. Devanagari terms match as
    substrings (inside compounds and inflected forms). Latin-script terms (English,
    IAST) match whole words, optionally followed by "s"/"es" ("karmas", "deeds"), or
    "ies" for a final consonant + "y" ("duties"); diacritics are ignored on both sides,
    so "ātman" matches "atman" and "Ātman". The words of a multi-word term match with
    any whitespace between them; an apostrophe matches ' or ’.
    """

    def __init__(self, terms: Iterable[str]) -> None:
        self.terms = tuple(t for t in terms if t.strip())
        self._devanagari = [_pattern(t) for t in self.terms if _is_devanagari(t)]
        self._latin = [_pattern(t) for t in self.terms if not _is_devanagari(t)]
        # One pass that matches where any Latin pattern matches: most texts hold none of a
        # lexicon's terms, and one alternation behind one look-behind is ~5x faster than each
        # pattern alone. The patterns themselves still find the spans (they may overlap).
        bodies = [p.pattern.removeprefix(r"(?<!\w)") for p in self._latin]
        self._any_latin = re.compile(rf"(?<!\w)(?:{'|'.join(bodies)})", re.IGNORECASE) if bodies else None

    @classmethod
    def from_module(cls, module_class: type) -> Lexicon:
        """The lexicon of a :class:`~dharma_kernel.protocol.DharmaModule` subclass's ``concepts``."""
        return cls(module_class.concepts)

    def __repr__(self) -> str:
        return f"Lexicon({len(self.terms)} terms)"

    def find(self, text: str) -> list[tuple[int, int]]:
        """Sorted character spans ``(start, end)`` in ``text`` where a term occurs; overlaps merged."""
        spans: list[tuple[int, int]] = []
        for patterns, fold in ((self._devanagari, False), (self._latin, True)):
            if not patterns:
                continue
            view, starts, ends = _view(text, fold)
            if fold and self._any_latin is not None and self._any_latin.search(view) is None:
                continue
            for pattern in patterns:
                spans += [(starts[m.start()], ends[m.end() - 1]) for m in pattern.finditer(view)]
        merged: list[tuple[int, int]] = []
        for start, end in sorted(spans):
            if merged and start < merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged

    def covers(self, text: str) -> bool:
        """Whether ``text`` as a whole is one of the terms (e.g. a record tag "Karma" or "कर्म")."""
        stripped = text.strip()
        offset = text.index(stripped) if stripped else 0
        return bool(stripped) and self.find(text) == [(offset, offset + len(stripped))]


def lexicons_for(refs: Sequence[str]) -> dict[str, Lexicon]:
    """The lexicon of each installed module ref (loads the plugin classes)."""
    from . import registry

    return {ref: Lexicon.from_module(registry.load(registry.resolve(ref, "module"))) for ref in refs}


def _names(ref: str, tag: str, lexicon: Lexicon) -> bool:
    tag = tag.strip().casefold()
    return tag in (ref.casefold(), ref.rpartition(".")[2].casefold()) or lexicon.covers(tag)


def concept_hits(
    text: str,
    offsets: Sequence[tuple[int, int]],
    lexicons: dict[str, Lexicon],
    refs: Sequence[str],
    tags: Iterable[str] = (),
) -> tuple[np.ndarray, np.ndarray | None]:
    """What :func:`token_labels` is made of, before it is made causal.

    ``tagged`` ``[M]`` (bool): the columns a record tag names. ``hits`` ``[T, M]`` (bool):
    for each lexicon hit in ``text``, the token that completes it (see :func:`_completing`),
    in the other columns; None when there is none. Packing makes hits causal per row.

    NumPy, not torch: this runs once per document, and torch's intra-op threads make
    such small operations slow while the tokenizer's own threads are about.
    """
    tags = list(tags)
    tagged = np.array([any(_names(ref, tag, lexicons[ref]) for tag in tags) for ref in refs], dtype=bool)
    hits = None
    for column, ref in enumerate(refs):
        if tagged[column]:
            continue
        spans = lexicons[ref].find(text)
        if not spans:
            continue
        if hits is None:
            bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            hits = np.zeros((len(offsets), len(refs)), dtype=bool)
        hits[:, column] = _completing(bounds[:, 0], bounds[:, 1], spans)
    return tagged, hits


def _completing(starts: np.ndarray, ends: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """For each of ``spans`` (sorted, as :meth:`Lexicon.find` gives them), the last token
    with a non-empty span that overlaps it: the first token at which a causal model has
    seen the whole term. A term split into pieces ("S" "eva" for "Seva") is known at
    its last piece; its first piece ("S") begins a thousand other words. A hit whose
    end lies past the last token (the text was truncated inside it) marks no token."""
    hit = np.zeros(len(starts), dtype=bool)
    real = np.flatnonzero(ends > starts)
    if not len(real):
        return hit
    bounds = np.asarray(spans, dtype=np.int64)
    last = np.searchsorted(starts[real], bounds[:, 1], side="left") - 1
    found = last >= 0
    last = np.maximum(last, 0)
    found &= (ends[real][last] > bounds[:, 0]) & (ends[real][last] >= bounds[:, 1])
    hit[real[last[found]]] = True
    return hit


def token_labels(
    text: str,
    offsets: Sequence[tuple[int, int]],
    lexicons: dict[str, Lexicon],
    refs: Sequence[str],
    tags: Iterable[str] = (),
) -> torch.Tensor:
    """Labels ``[T, M]`` (float, columns in ``refs`` order) for one tokenized text.

    ``offsets`` are each token's character span in ``text``. For each module:

    - a record tag naming it (its name, its full ref, or one of its terms, any case)
      labels every token 1: the record is about the concept as a whole;
    - otherwise labels are causal, "the concept so far": 0 before the token that
      completes the first lexicon hit, 1 from that token on. The modules are causal, so
      at token t a module sees only tokens <= t; asking it to fire before the whole
      term has appeared would train it to guess the future, and labelling the whole
      text from a late hit would punish a correct detector on every earlier token.

    Tokens with an empty span (special tokens report ``(0, 0)``) are -100, ignored.
    """
    tagged, hits = concept_hits(text, offsets, lexicons, refs, tags)
    labels = np.zeros((len(offsets), len(refs)), dtype=np.float32)
    if hits is not None:
        labels[np.logical_or.accumulate(hits, axis=0)] = 1.0
    labels[:, tagged] = 1.0
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    labels[bounds[:, 1] <= bounds[:, 0]] = IGNORE
    return torch.from_numpy(labels)


def encode(texts: Sequence[str], tokenizer: Any, max_length: int = 256) -> dict[str, Any]:
    """Tokenize with a fast tokenizer, right-padded: ``input_ids``, ``attention_mask``, ``offsets``.

    Pads by hand so tokenizers without a pad token (GPT-2's) work unchanged; pad id is
    the pad token's, else EOS, else 0. ``offsets`` stays a list of unpadded lists.
    """
    encoded = tokenizer(
        list(texts), return_offsets_mapping=True, truncation=True, max_length=max_length, padding=False
    )
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    pad = pad_id(tokenizer)
    width = max((len(row) for row in ids), default=0)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "offsets": offsets}


def label_batch(
    texts: Sequence[str],
    tokenizer: Any,
    refs: Sequence[str],
    tags: Sequence[Iterable[str]] | None = None,
    max_length: int = 256,
    lexicons: dict[str, Lexicon] | None = None,
) -> dict[str, torch.Tensor]:
    """A right-padded batch with ``concept_labels`` ``[B, T, M]`` for :meth:`DharmaModel.forward`.

    ``refs`` gives the label columns (use ``model.module_refs``); ``tags`` holds each
    text's record tags. ``lexicons`` defaults to the installed plugins' own; pass
    :func:`lexicons_for` once when labelling many batches. Padding and special tokens
    are labelled -100.
    """
    lexicons = lexicons if lexicons is not None else lexicons_for(refs)
    batch = encode(texts, tokenizer, max_length)
    ids = batch["input_ids"]
    concept_labels = torch.full((*ids.shape, len(refs)), float(IGNORE))
    for row, (text, offsets) in enumerate(zip(texts, batch["offsets"], strict=True)):
        record_tags = tags[row] if tags is not None else ()
        concept_labels[row, : len(offsets)] = token_labels(text, offsets, lexicons, refs, record_tags)
    return {"input_ids": ids, "attention_mask": batch["attention_mask"], "concept_labels": concept_labels}
