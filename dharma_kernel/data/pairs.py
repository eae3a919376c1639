"""Source-target pairs (Sanskrit and English) from the seed formats and numbered plain-text translations.

    pairs = read_pairs(["../shared/seed-data"])    # verse databases, scripture records, the Gita

- Any file the data readers know whose records carry a pair (verse databases, scripture
  records, Vedic mantras, teachings: see :mod:`.seed_formats`) gives those pairs; records
  without one are skipped.
- A plain-text translation numbered by chapter and verse (see :mod:`.verse_translation`) is
  paired with the Sanskrit verses of the Sanskrit corpora among the same paths, or, when the
  paths name none, those in the directory tree it sits in (two levels up: ``seed-data/``
  for ``seed-data/complete_scriptures/gita/bhagavad_gita.txt``).

``{"source", "target"}`` JSONL files are task records that heads read themselves
(:mod:`dharma_kernel.head_data`). Exact repeats of a pair are kept once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .fields import BadFile
from .paths import expand_paths
from .readers import HEAD_BYTES, read_records
from .report import DataReport
from .verse_translation import (
    aligned_pairs,
    is_numbered_translation,
    numbered_verses,
    sanskrit_verses,
    work_name,
)

__all__ = ["Pair", "is_sanskrit_corpus", "read_pairs"]

CORPUS_SEARCH_LEVELS = 2  # how far above a translation file its Sanskrit corpus is looked for


@dataclass(frozen=True)
class Pair:
    """A source text and its translation; ``file`` and ``index`` (record, or verse line) say where from."""

    source: str
    target: str
    file: str = ""
    index: int = 0


def read_pairs(paths: Sequence[str | Path], report: DataReport | None = None) -> list[Pair]:
    """Every pair in the files the paths name (files, directories, globs), in file order.

    Malformed files and records are skipped and counted in ``report``, as in :func:`read_records`.
    """
    report = DataReport() if report is None else report
    pairs: list[Pair] = []
    translations: list[Path] = []
    corpora: list[Path] = []
    for path in expand_paths(paths):
        head = _head(path)
        if path.suffix.lower() == ".txt" and is_numbered_translation(head):
            translations.append(path)
            continue
        if is_sanskrit_corpus(path, head):
            corpora.append(path)
        pairs += [
            Pair(*record.pair, record.source, record.index)
            for record in read_records([path], report=report)
            if record.pair
        ]
    for path in translations:
        verses = _sanskrit(corpora or _corpora_near(path), report)
        found = list(aligned_pairs(numbered_verses(path), work_name(path), verses))
        report.files_read += 1
        report.records_read += len(found)
        pairs += [Pair(text, verse.text, str(path), verse.line) for verse, text in found]
    unique: dict[tuple[str, str], Pair] = {}
    for pair in pairs:
        unique.setdefault((pair.source, pair.target), pair)
    return list(unique.values())


def is_sanskrit_corpus(path: Path, head: str) -> bool:
    """A JSON file of Sanskrit verses numbered by chapter and verse."""
    return path.suffix.lower() == ".json" and all(
        re.search(rf'"{key}"\s*:', head) for key in ("sanskrit_original", "chapter", "verse")
    )


def _sanskrit(corpora: list[Path], report: DataReport) -> dict[tuple[str, int, int], str]:
    verses: dict[tuple[str, int, int], str] = {}
    for path in corpora:
        try:
            for key, text in sanskrit_verses(path).items():
                verses.setdefault(key, text)
        except BadFile as err:
            report.bad_file(str(path), str(err))
    return verses


def _corpora_near(path: Path) -> list[Path]:
    top = path.resolve().parents[min(CORPUS_SEARCH_LEVELS, len(path.resolve().parents) - 1)]
    return [found for found in expand_paths([top]) if is_sanskrit_corpus(found, _head(found))]


def _head(path: Path) -> str:
    try:
        with path.open("rb") as file:
            return file.read(HEAD_BYTES).decode("utf-8", errors="replace").lstrip("\ufeff")
    except OSError:
        return ""
