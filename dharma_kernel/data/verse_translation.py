"""A plain-text translation numbered by chapter and verse, paired with the Sanskrit verses it translates.

The seed system's Bhagavad Gita translation (``complete_scriptures/gita/bhagavad_gita.txt``) is
English only: each chapter's verses are paragraphs opening ``12.`` (or ``32-34.`` for verses
translated together), a chapter ends with a line ``The end of ... chapter ...``, and page
markers (``p. 19``), speaker lines (``Arjuna said:``) and footnote numbers sit between them. The
Sanskrit corpus holds the same verses with ``chapter`` and ``verse`` fields. Matching the two by
(chapter, verse) gives Sanskrit-English pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fields import BadFile, load_json, read_text

__all__ = [
    "NumberedVerse",
    "aligned_pairs",
    "is_numbered_translation",
    "numbered_verses",
    "sanskrit_verses",
    "work_name",
]

_VERSE = re.compile(r"^(\d+)(?:-(\d+))?\.\s+(\S.*)$")
_CHAPTER_END = re.compile(r"^The end of\b.*\bchapter\b", re.IGNORECASE)
_PAGE = re.compile(r"^p\. [0-9ivxlc]+(?: p\. [0-9ivxlc]+)*$")
_INLINE_PAGE = re.compile(r"\s*\bp\. \d+\b")
_SPEAKER = re.compile(r"^[A-Z][\w' ]{0,40} said:$")
_SKIP = re.compile(r"^(=+|CHAPTER \d+|Next: .*|.*at sacred-texts\.com)$")
_NOTE_MARK = re.compile(r"(\s\*|\s\d+)+$")  # a footnote's number or asterisk after the verse


@dataclass(frozen=True)
class NumberedVerse:
    """An English verse (or run of verses ``first``..``last``) of ``chapter``, at ``line`` of its file."""

    chapter: int
    first: int
    last: int
    text: str
    line: int


def is_numbered_translation(head: str) -> bool:
    """Whether a text file's opening looks like a numbered translation (it names chapters and verses)."""
    return bool(re.search(r"^CHAPTER \d+$", head, re.MULTILINE)) and bool(
        re.search(r"^\d+\.\s+\S", head, re.MULTILINE)
    )


def work_name(path: Path) -> str:
    """The work a translation file translates: its title line up to `` - `` (``bhagavad gita``)."""
    for line in read_text(path).splitlines()[:10]:
        line = line.strip()
        if line and not line.startswith("="):
            return _normal(line.split(" - ")[0])
    return ""


def numbered_verses(path: Path) -> list[NumberedVerse]:
    """The verses of every chapter, in file order.

    A chapter is the last run of verses starting at ``1.`` before a ``The end of ... chapter``
    line (numbered prayers before the first chapter are thereby left out); the n-th such line
    closes chapter n.
    """
    verses: list[NumberedVerse] = []
    chapter: list[list[Any]] = []  # [first, last, lines, line number] per verse
    inside = False
    closed = 0
    for number, raw in enumerate(read_text(path).splitlines(), 1):
        line = raw.strip().removeprefix("[paragraph continues]").strip()
        if _CHAPTER_END.match(line):
            closed += 1
            verses += [NumberedVerse(closed, a, b, _verse_text(parts), at) for a, b, parts, at in chapter]
            chapter, inside = [], False
            continue
        match = _VERSE.match(line)
        if match:
            first = int(match.group(1))
            if first == 1:
                chapter, inside = [], True
            if inside:
                chapter.append([first, int(match.group(2) or first), [match.group(3)], number])
            continue
        if (
            inside
            and chapter
            and line
            and not (_PAGE.match(line) or _SPEAKER.match(line) or _SKIP.match(line))
        ):
            chapter[-1][2].append(line)
    return verses


def _verse_text(lines: list[str]) -> str:
    text = _INLINE_PAGE.sub("", " ".join(lines))
    return _NOTE_MARK.sub("", text).strip()


def sanskrit_verses(path: Path) -> dict[tuple[str, int, int], str]:
    """``(work, chapter, verse) -> Sanskrit`` from a Sanskrit corpus (``{"texts": [...]}`` whose
    records carry integer ``chapter`` and ``verse``); the work is the Latin name in the record's
    ``source`` (``श्रीमद्भगवद्गीता (Bhagavad Gita)`` -> ``bhagavad gita``). The first record of a
    verse wins."""
    data = load_json(path)
    texts = data.get("texts") if isinstance(data, dict) else None
    if not isinstance(texts, list):
        raise BadFile("a Sanskrit corpus should be an object with a list 'texts'")
    found: dict[tuple[str, int, int], str] = {}
    for item in texts:
        if not isinstance(item, dict):
            continue
        chapter, verse, text = item.get("chapter"), item.get("verse"), item.get("sanskrit_original")
        latin = re.search(r"\(([^)]+)\)", str(item.get("source", "")))
        if isinstance(chapter, int) and isinstance(verse, int) and isinstance(text, str) and latin:
            found.setdefault((_normal(latin.group(1)), chapter, verse), text.strip())
    return found


def aligned_pairs(
    verses: list[NumberedVerse], work: str, sanskrit: dict[tuple[str, int, int], str]
) -> Iterator[tuple[NumberedVerse, str]]:
    """Each English verse with its Sanskrit (a run of verses joined by spaces); runs with a verse
    missing from the Sanskrit are left out.

    Where the Sanskrit counts more verses in a chapter than the translation numbers, the extra
    ones are taken to open the chapter: the corpus numbers Arjuna's question that opens Gita
    chapter 13 (35 verses), which the translation leaves unnumbered (34).
    """
    last: dict[int, int] = {}
    for verse in verses:
        last[verse.chapter] = max(last.get(verse.chapter, 0), verse.last)
    counts: dict[int, int] = {}
    for name, chapter, _ in sanskrit:
        if name == work:
            counts[chapter] = counts.get(chapter, 0) + 1
    for verse in verses:
        shift = max(0, counts.get(verse.chapter, 0) - last[verse.chapter])
        numbers = range(verse.first + shift, verse.last + shift + 1)
        parts = [sanskrit.get((work, verse.chapter, n)) for n in numbers]
        if verse.text and all(parts):
            yield verse, " ".join(part for part in parts if part)


def _normal(name: str) -> str:
    return " ".join(re.sub(r"[^\w ]", " ", name.lower()).split())
