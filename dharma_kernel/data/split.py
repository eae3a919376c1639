"""Holding out evaluation records: by a hash of each text, so a record's side never changes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .records import Record

__all__ = ["split_records"]


def _draw(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by ``text`` and ``seed``: the same in every process and Python version."""
    digest = hashlib.sha256(f"{seed}\n{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(
    records: Sequence[Record], eval_fraction: float, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """``(train, eval)``: a record goes to eval when the hash of its text and ``seed`` falls
    below ``eval_fraction``; order is kept on both sides.

    A record's side depends only on its text and the seed, not on the other records, so
    adding data never moves a record from eval into train. With ``eval_fraction > 0`` and
    at least two records neither side is empty: if the hash leaves one empty, the record
    nearest the threshold crosses over.
    """
    draws = [_draw(record.text, seed) for record in records]
    held = [draw < eval_fraction for draw in draws]
    if eval_fraction > 0 and len(records) >= 2:
        if not any(held):
            held[min(range(len(draws)), key=draws.__getitem__)] = True
        elif all(held):
            held[max(range(len(draws)), key=draws.__getitem__)] = False
    train = [record for record, out in zip(records, held, strict=True) if not out]
    evaluation = [record for record, out in zip(records, held, strict=True) if out]
    return train, evaluation
