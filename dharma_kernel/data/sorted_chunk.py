"""A chunk of records cleaned and sorted for the spool by a cleaning process; the main process only decides.

    chunk = sort_chunk(clean_chunk, records, min_chars=20, seed=0, fraction=0.01)
    for reason, digest, draw, side in chunk.marks: ...   # what deciding each record needs
    file.write(chunk.pickled["train"])    # the kept records of a side, pickled, when none is a duplicate

:func:`~dharma_kernel.data.prepare.prepare` reads on one process and cleans on the
others. The main process must keep the order and decide exact duplicates (a hash set
over the whole corpus), but everything else about a record is its own: cleaning, too
short or empty, its hash, its held-out draw, its side. A cleaning process works those
out and pickles each side's records as the spool stores them; the main process writes
those bytes as they are unless a duplicate must come out. That halves the main
process's work per record, which, on two cores, bounds the whole pass.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass

from .clean import early_drop, text_hash
from .records import Record
from .split import _draw

__all__ = ["Mark", "SortedChunk", "sort_chunk"]


Mark = tuple[str | None, bytes, float, str]
"""One record of a chunk: ``(reason, digest, draw, side)``. ``reason``: why it is dropped whatever
came before (``"empty"``, ``"too_short"``), or None; then ``digest`` (its
:func:`~dharma_kernel.data.clean.text_hash`), ``draw`` and ``side`` (``"train"`` or ``"eval"``).
Plain tuples: a chunk holds tens of thousands, pickled back to the main process."""


@dataclass
class SortedChunk:
    """``marks``: a :data:`Mark` per record, in order. ``pickled``: each side's records that no
    ``reason`` drops, in order, pickled as one list (absent when none)."""

    marks: list[Mark]
    pickled: dict[str, bytes]

    def side(self, side: str, keep: list[bool]) -> list[Record]:
        """The records of ``side`` whose entry in ``keep`` (one per such record) is true."""
        records = pickle.loads(self.pickled[side]) if side in self.pickled else []
        return [record for record, kept in zip(records, keep, strict=True) if kept]


def sort_chunk(
    clean: Callable[[list[Record]], list[Record]],
    records: list[Record],
    min_chars: int,
    seed: int,
    fraction: float,
    side: str | None = None,
) -> SortedChunk:
    """``records`` cleaned by ``clean``, marked and sorted: held out (a draw under ``fraction``,
    as :func:`~dharma_kernel.data.split.split_records` draws) or not; ``side`` puts all on one."""
    marks: list[Mark] = []
    sides: dict[str, list[Record]] = {"train": [], "eval": []}
    for record in clean(records):
        reason = early_drop(record, min_chars)
        if reason is not None:
            marks.append((reason, b"", 1.0, "train"))
            continue
        draw = _draw(record.text, seed) if fraction > 0 else 1.0
        where = side or ("eval" if draw < fraction else "train")
        marks.append((None, text_hash(record.text), draw, where))
        sides[where].append(record)
    protocol = pickle.HIGHEST_PROTOCOL
    return SortedChunk(marks, {name: pickle.dumps(kept, protocol) for name, kept in sides.items() if kept})
