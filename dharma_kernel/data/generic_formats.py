"""Readers for the general formats: plain text, JSON Lines, and a JSON list of records."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from itertools import chain, pairwise
from pathlib import Path
from typing import Any

from .fields import (
    LINE_BYTES,
    TOO_DEEP,
    BadRecord,
    build_each,
    load_json,
    object_record,
    read_text,
    require_list,
    text_lines,
)
from .records import Record
from .report import DataReport

__all__ = ["JsonRecordsReader", "JsonlReader", "TextReader", "iter_paragraphs", "paragraphs"]

# A paragraph longer than this becomes several records: tokenizing one huge string at once
# needs memory far beyond its size (a 50 MB line took 10 GB).
PARAGRAPH_CHARS = LINE_BYTES

# A line of one repeated mark (----, ====, ****): decoration between or under headings.
_RULE = re.compile(r"^\s*([=\-_*~#])\1{2,}\s*$")


def _is_rule(line: str) -> bool:
    return _RULE.match(line) is not None


def paragraphs(text: str) -> list[str]:
    """Blocks of lines separated by blank lines (see :func:`iter_paragraphs`)."""
    return list(iter_paragraphs(text.splitlines()))


def iter_paragraphs(lines: Iterable[str], limit: int = PARAGRAPH_CHARS) -> Iterator[str]:
    """Blocks of lines separated by blank lines, as the lines stream in.

    Rule lines are dropped. A line with a rule under it is a heading and starts a new
    block (its rule does not end it), so text written without blank lines still splits
    at its headings. A block that grows past ``limit`` characters ends there: one record
    must stay small enough to tokenize, however long the text runs without a blank line.
    """
    block: list[str] = []
    size = 0
    previous: str | None = None
    for line, following in pairwise(chain(lines, [None])):
        after_heading = previous is not None and bool(previous.strip()) and not _is_rule(previous)
        previous = line
        starts_block = not line.strip() or (_is_rule(line) and not after_heading)
        if not starts_block and _is_rule(line):
            continue
        full = bool(block) and size + len(line) > limit
        if starts_block or (following is not None and _is_rule(following)) or full:
            if any(part.strip() for part in block):
                yield "\n".join(block)
            block, size = [], 0
        if not starts_block:
            block.append(line)
            size += len(line) + 1
    if any(part.strip() for part in block):
        yield "\n".join(block)


class TextReader:
    """``.txt``: one record per paragraph (see :func:`iter_paragraphs`), streamed; no tags, no pair."""

    name = "text"
    suffixes = (".txt",)

    def sniff(self, path: Path, head: str) -> bool:
        return True

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        blocks = iter_paragraphs(text_lines(path))
        yield from build_each(path, enumerate(blocks, 1), Record, report)


class JsonlReader:
    """``.jsonl``: one JSON object per line; blank lines are skipped; index is the line number.

    text: ``text``, or ``messages`` (``role``/``content`` turns) rendered as
    ``"User: ...\\nAssistant: ..."``; a leading ``"[category] "`` label is dropped.
    tags: ``tags`` (a list, or a list written as a string) then ``category``. No pair.
    """

    name = "jsonl"
    suffixes = (".jsonl",)

    def sniff(self, path: Path, head: str) -> bool:
        return True

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        lines = read_text(path).splitlines()
        numbered = ((number, line) for number, line in enumerate(lines, 1) if line.strip())
        yield from build_each(path, numbered, lambda line: object_record(_parse_line(line)), report)


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRecord(f"invalid JSON at column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise BadRecord(TOO_DEEP) from None


class JsonRecordsReader:
    """``.json`` holding a list of records shaped as in ``.jsonl`` (e.g. a list of conversations).

    text, tags: as :class:`JsonlReader`; index is the position in the list.
    """

    name = "json-records"
    suffixes = (".json",)

    def sniff(self, path: Path, head: str) -> bool:
        return head.lstrip().startswith("[") and re.search(r'"(text|messages)"\s*:', head) is not None

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        items = require_list(load_json(path), "the top level")
        yield from build_each(path, enumerate(items, 1), object_record, report)
