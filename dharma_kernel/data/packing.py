"""Packing: records tokenized, each followed by EOS, concatenated and cut into rows of one length.

    packed = pack(records, tokenizer, max_length=128, refs=model.module_refs)
    loss = model(**packed.batch([0, 1, 2, 3])).loss

Conversations (records with ``messages``) are packed apart, after the text rows, by
:func:`~dharma_kernel.data.chat.pack_conversations`: rendered with the chat
template, whole conversations to a row, loss on the assistant's turns only.

No row is wasted on padding but the last. A row may hold the end of one document
and the start of the next; the model is never asked to predict a document's first
token from the one before it (that label is -100), but it is trained to predict the
EOS that ends each document. Tokens attend across the documents in a row, as in
GPT-2's training; the EOS between them marks the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

from ..concepts import IGNORE, Lexicon, concept_hits, lexicons_for
from ..errors import DharmaError
from ..padding import pad_id
from .fast_bpe import Flat, fast_encoder, reference_ids
from .packed import PackedData
from .records import Record
from .report import DataReport

__all__ = ["PackedData", "pack"]


def pack(
    records: Sequence[Record],
    tokenizer: Any,
    max_length: int,
    refs: Sequence[str] = (),
    lexicons: dict[str, Lexicon] | None = None,
    report: DataReport | None = None,
) -> PackedData:
    """Tokenize ``records`` and pack them into rows of exactly ``max_length`` tokens.

    Records with ``messages`` become the chat rows of
    :func:`~dharma_kernel.data.chat.pack_conversations` (counted in ``report``), after
    the rows of the others, which are packed as follows.

    Each document is its tokens (after the tokenizer's BOS when it has one other than
    EOS), then EOS; the last row is right-padded with the pad token (else EOS). Text
    that spells a special token (``<|endoftext|>``) is tokenized as text, so only real
    document ends are EOS. With ``refs``, concept labels are computed for each piece of
    a document that lands in one row, as :func:`~dharma_kernel.concepts.token_labels`
    would on that piece alone: a lexicon hit in an earlier row, which the model cannot
    see, does not label tokens in a later one; a record tag labels all its tokens.
    ``lexicons`` defaults to the installed plugins' own.
    """
    chats = [record for record in records if record.messages is not None]
    if chats:
        from .chat import pack_conversations

        texts_only = [record for record in records if record.messages is None]
        lexicons = lexicons if lexicons is not None or not refs else lexicons_for(refs)
        parts = [pack(texts_only, tokenizer, max_length, refs, lexicons)] if texts_only else []
        parts.append(pack_conversations(chats, tokenizer, max_length, report, refs, lexicons))
        return _concat(parts)
    stream = TextStream(tokenizer, max_length, refs, lexicons)
    pieces = [stream.encode(records), stream.padding()]
    return rows_of(pieces, max_length, tuple(refs))


@dataclass
class Piece:
    """A stretch of the flat token stream: ``ids`` [n], ``trained`` [n] bool (the label is the
    token), ``real`` [n] bool (not padding), ``concepts`` [n, M] int8 or None."""

    ids: np.ndarray
    trained: np.ndarray
    real: np.ndarray
    concepts: np.ndarray | None


class TextStream:
    """Text records appended, in order, to one token stream that is cut into rows of ``max_length``.

    Each :meth:`encode` call gives the next stretch of the stream, so a corpus can be
    packed in chunks with the same result as all at once; :meth:`padding` ends it.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        refs: Sequence[str] = (),
        lexicons: dict[str, Lexicon] | None = None,
    ) -> None:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DharmaError(
                "the tokenizer has no end-of-text (eos) token, which packing puts between documents",
                hint="Use a tokenizer with an eos_token, or backbone.tokenizer = { train = true }.",
            )
        bos = tokenizer.bos_token_id
        self.tokenizer, self.eos, self.max_length = tokenizer, eos, max_length
        self.prefix = [bos] if bos is not None and bos != eos else []
        self.pad = pad_id(tokenizer)
        self.refs = tuple(refs)
        self.lexicons = lexicons if lexicons is not None or not self.refs else lexicons_for(self.refs)
        self.position = 0  # tokens in the stream so far

    def tokenize(self, records: Sequence[Record]) -> tuple[list[list[int]] | Flat, list[Any]]:
        """What :meth:`encode` needs of the tokenizer for ``records``; a caller may run it ahead,
        on another thread, and hand the result to :meth:`encode`."""
        texts = [record.text for record in records]
        if not self.refs:  # no offsets needed: tiktoken's ids end to end, when it can give them
            encoder = fast_encoder(self.tokenizer, texts)
            if encoder is not None:
                return encoder.encode_flat(texts), []
        return _tokenize(self.tokenizer, texts, bool(self.refs))

    def encode(
        self, records: Sequence[Record], tokenized: tuple[list[list[int]] | Flat, list[Any]] | None = None
    ) -> Piece:
        """The next stretch: each record's tokens (after BOS when there is one besides EOS), then EOS.
        ``tokenized``: :meth:`tokenize`'s result for these records, when the caller has it."""
        ids, offsets = tokenized if tokenized is not None else self.tokenize(records)
        if isinstance(ids, Flat):
            lengths = ids.lengths + len(self.prefix) + 1
        else:
            lengths = np.fromiter((len(self.prefix) + len(doc) + 1 for doc in ids), np.int64, len(ids))
        starts = np.cumsum(lengths) - lengths  # within this piece
        size = int(lengths.sum())
        if isinstance(ids, Flat):
            tokens = np.empty(size, dtype=np.int64)
            body = np.ones(size, dtype=bool)
            for at, token in [*enumerate(self.prefix), (-1, self.eos)]:
                where = starts + at if at >= 0 else starts + lengths - 1
                tokens[where] = token
                body[where] = False
            tokens[body] = ids.ids
        else:
            tokens = np.fromiter(
                chain.from_iterable([*self.prefix, *doc, self.eos] for doc in ids), np.int64, size
            )
        trained = np.ones(size, dtype=bool)
        # A document's first token after another's EOS in the same row is never predicted.
        trained[starts[(starts + self.position) % self.max_length != 0]] = False
        concepts = None
        if self.refs:
            first = (starts + len(self.prefix)).tolist()
            concepts = _concept_labels(
                records,
                offsets,
                first,
                size,
                self.position,
                self.max_length,
                self.lexicons,
                self.refs,  # type: ignore[arg-type]
            )
        self.position += size
        return Piece(tokens, trained, np.ones(size, dtype=bool), concepts)

    def padding(self) -> Piece:
        """Pad tokens that fill the last row."""
        size = -self.position % self.max_length
        self.position += size
        concepts = np.full((size, len(self.refs)), IGNORE, dtype=np.int8) if self.refs else None
        none = np.zeros(size, dtype=bool)
        return Piece(np.full(size, self.pad, dtype=np.int64), none, none.copy(), concepts)


def rows_of(pieces: Sequence[Piece], max_length: int, refs: tuple[str, ...]) -> PackedData:
    """The stream the pieces make, whole rows of ``max_length``, as tensors."""
    ids = torch.from_numpy(np.concatenate([piece.ids for piece in pieces]))
    trained = torch.from_numpy(np.concatenate([piece.trained for piece in pieces]))
    real = torch.from_numpy(np.concatenate([piece.real for piece in pieces]))
    concept_labels = None
    if refs:
        concepts = np.concatenate([piece.concepts for piece in pieces])  # type: ignore[misc]
        concept_labels = torch.from_numpy(concepts).view(-1, max_length, len(refs))
    return PackedData(
        input_ids=ids.view(-1, max_length),
        labels=torch.where(trained, ids, IGNORE).view(-1, max_length),
        attention_mask=real.long().view(-1, max_length),
        concept_labels=concept_labels,
        refs=refs,
    )


def _concat(parts: list[PackedData]) -> PackedData:
    if len(parts) == 1:
        return parts[0]
    concept = [part.concept_labels for part in parts]
    return PackedData(
        input_ids=torch.cat([part.input_ids for part in parts]),
        labels=torch.cat([part.labels for part in parts]),
        attention_mask=torch.cat([part.attention_mask for part in parts]),
        concept_labels=torch.cat(concept) if all(c is not None for c in concept) else None,  # type: ignore[arg-type]
        refs=parts[0].refs,
    )


def _tokenize(
    tokenizer: Any, texts: list[str], with_offsets: bool, chunk: int = 4096
) -> tuple[list[list[int]], list[Any]]:
    """Token ids (and character offsets: ``(start, end)`` pairs or ``[T, 2]`` arrays) of each text,
    no special tokens added; on every core (tiktoken's threads for a GPT-2-shaped BPE, see
    :mod:`~dharma_kernel.data.fast_bpe`, else the Rust tokenizer's batches)."""
    encoder = fast_encoder(tokenizer, texts)
    if encoder is not None and not with_offsets:
        return encoder.encode(texts), []
    if encoder is not None and encoder.byte_lengths is not None:
        return encoder.encode_with_offsets(texts)  # type: ignore[return-value]
    if not with_offsets:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            return reference_ids(backend, texts), []
    ids: list[list[int]] = []
    offsets: list[list[tuple[int, int]]] = []
    for begin in range(0, len(texts), chunk):
        encoded = tokenizer(
            texts[begin : begin + chunk],
            add_special_tokens=False,
            return_attention_mask=False,
            return_offsets_mapping=with_offsets,
            split_special_tokens=True,
            verbose=False,  # documents longer than model_max_length are fine: packing cuts them
        )
        ids += encoded["input_ids"]
        if with_offsets:
            offsets += encoded["offset_mapping"]
    return ids, offsets


def _concept_labels(
    records: Sequence[Record],
    offsets: list[Any],
    first: list[int],
    size: int,
    position: int,
    max_length: int,
    lexicons: dict[str, Lexicon],
    refs: tuple[str, ...],
) -> torch.Tensor:
    """``[size, M]`` int8 labels over a piece of the stream that starts at ``position``: 0 on text
    tokens, then tags and hits, -100 elsewhere.

    Built in NumPy: see :func:`~dharma_kernel.concepts.concept_hits` for why.
    """
    labels = np.full((size, len(refs)), IGNORE, dtype=np.int8)
    for record, spans, begin in zip(records, offsets, first, strict=True):
        end = begin + len(spans)
        labels[begin:end] = 0
        tagged, hits = concept_hits(record.text, spans, lexicons, refs, record.tags)
        labels[begin:end, tagged] = 1
        if hits is not None:
            # Causal within each row: a piece of the document starts at ``begin`` or at a row start.
            at = begin + position  # where the document's piece sits in the whole stream
            row_starts = range((at // max_length + 1) * max_length - position, end, max_length)
            cuts = [begin, *row_starts, end]
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                seen = np.logical_or.accumulate(hits[a - begin : b - begin], axis=0)
                labels[a:b][seen] = 1
        bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        labels[begin:end][bounds[:, 1] <= bounds[:, 0]] = IGNORE
    return labels
