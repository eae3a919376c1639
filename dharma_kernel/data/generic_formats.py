"""Readers for the general formats: plain text, JSON Lines, and a JSON list of records."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .fields import BadRecord, build_each, load_json, object_record, read_text, require_list
from .records import Record
from .report import DataReport

__all__ = ["JsonRecordsReader", "JsonlReader", "TextReader", "paragraphs"]

# A line of one repeated mark (----, ====, ****): decoration between or under headings.
_RULE = re.compile(r"^\s*([=\-_*~#])\1{2,}\s*$")


def _is_rule(line: str) -> bool:
    return _RULE.match(line) is not None


def paragraphs(text: str) -> list[str]:
    """Blocks of lines separated by blank lines.

    Rule lines are dropped. A line with a rule under it is a heading and starts a new
    block (its rule does not end it), so text written without blank lines still splits
    at its headings.
    """
    lines = text.splitlines()
    blocks: list[list[str]] = [[]]
    for number, line in enumerate(lines):
        after_heading = number > 0 and bool(lines[number - 1].strip()) and not _is_rule(lines[number - 1])
        if not line.strip() or (_is_rule(line) and not after_heading):
            blocks.append([])
        elif _is_rule(line):
            continue
        else:
            if number + 1 < len(lines) and _is_rule(lines[number + 1]):
                blocks.append([])
            blocks[-1].append(line)
    return ["\n".join(block) for block in blocks if any(line.strip() for line in block)]


class TextReader:
    """``.txt``: one record per paragraph (see :func:`paragraphs`); no tags, no pair."""

    name = "text"
    suffixes = (".txt",)

    def sniff(self, path: Path, head: str) -> bool:
        return True

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        blocks = paragraphs(read_text(path))
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
