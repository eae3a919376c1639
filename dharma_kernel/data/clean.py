"""Cleaning: markup and encoding noise out, too-short and duplicate records dropped, all counted."""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import replace

from .records import Record
from .report import DataReport

__all__ = ["clean_records", "clean_text"]

_INDIC = "\u0900-\u0dff\u1cd0-\u1cff\ua8e0-\ua8ff"  # Devanagari, the other Indic scripts, Vedic marks
_INVISIBLE = re.compile(
    "[\u00ad\u200b\u200e\u200f\u2060\ufeff\u202a-\u202e\u2066-\u2069]"
    # ZWJ/ZWNJ choose conjunct forms in Indic scripts; elsewhere they are noise.
    f"|(?<![{_INDIC}])[\u200c\u200d]"
)
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_BREAK = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|h[1-6]|blockquote)\b[^<>]*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_MD_LINK = re.compile(r"\[([^\]\n]+)\]\((?:https?://|www\.)[^)\s]*\)")
_URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"]+")
_MD_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]+", re.MULTILINE)
_MD_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_MD_EMPHASIS = re.compile(
    r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])"  # *word*, not 2*3*4 or a "* " bullet
    r"|(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])"  # _word_, not snake_case_names
)
_REPEATED_MARK = re.compile(r"([!?,;:])\1+")
_LONG_ELLIPSIS = re.compile(r"\.{4,}")
_DECORATION = re.compile(r"([=\-_*~#+])\1{3,}")
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """``text`` without markup and encoding noise, whitespace collapsed, NFC-normalised.

    Removes HTML tags, comments and entities, URLs, markdown heading and emphasis
    markers, zero-width and control characters, and runs of decoration (``=====``);
    collapses repeated punctuation (``!!!``, ``.......``) and spaces; keeps line breaks,
    at most one blank line in a row. Letters of every script, Devanagari and IAST
    diacritics included, are kept as they are (in NFC).
    """
    for needed, step in _STEPS:
        if needed(text):
            text = step(text)
    return text


def _has(*marks: str) -> Callable[[str], bool]:
    """Whether the text holds one of ``marks``: a step whose pattern needs one is skipped
    without them (a substring search costs far less than a regular expression's pass)."""
    if len(marks) == 1:
        mark = marks[0]
        return lambda text: mark in text
    if len(marks) == 2:  # unrolled: a generator per text cost more than the searches (1.4 M texts a GB)
        first, second = marks
        return lambda text: first in text or second in text
    return lambda text: any(map(text.__contains__, marks))


def _always(text: str) -> bool:
    return True


def _newlines(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    return text.replace("\x0b", "\n").replace("\x0c", "\n")


def _spaced(text: str) -> bool:
    # After the steps before, ASCII text holds no whitespace but " " and "\n" unless a tab.
    return not text.isascii() or "  " in text or "\t" in text


def _edges(text: str) -> bool:
    # Only " " and "\n" are whitespace by now, so a line has spaces to strip only here.
    return " \n" in text or "\n " in text or text.startswith(" ") or text.endswith(" ")


# Each step with the test that must hold for it to change anything, in order.
_STEPS: tuple[tuple[Callable[[str], bool], Callable[[str], str]], ...] = (
    (_has("\r", "\u2028", "\u2029", "\x0b", "\x0c"), _newlines),
    (_has("<!--"), lambda text: _HTML_COMMENT.sub("", text)),
    (_has("<"), lambda text: _HTML_TAG.sub("", _HTML_BREAK.sub("\n", text))),
    (_always, html.unescape),  # returns at once without "&"
    (lambda text: not text.isascii(), lambda text: _INVISIBLE.sub("", text)),
    (_always, lambda text: _CONTROL.sub("", text)),
    (_has("://", "www."), lambda text: _URL.sub("", _MD_LINK.sub(r"\1", text))),
    (_has("#"), lambda text: _MD_HEADING.sub("", text)),
    (_has("**", "__"), lambda text: _MD_STRONG.sub(r"\2", text)),
    (_has("*", "_"), lambda text: _MD_EMPHASIS.sub(lambda match: match.group(1) or match.group(2), text)),
    (_has("====", "----", "____", "****", "~~~~", "####", "++++"), lambda text: _DECORATION.sub(" ", text)),
    (_has("!!", "??", ",,", ";;", "::"), lambda text: _REPEATED_MARK.sub(r"\1", text)),
    (_has("...."), lambda text: _LONG_ELLIPSIS.sub("...", text)),
    (_spaced, lambda text: _SPACES.sub(" ", text)),
    (_edges, lambda text: "\n".join(line.strip() for line in text.split("\n"))),
    (_has("\n\n\n"), lambda text: _BLANK_LINES.sub("\n\n", text)),
    (_always, lambda text: unicodedata.normalize("NFC", text.strip())),
)


def clean_record(record: Record) -> Record:
    """``record`` with :func:`clean_text` applied to its text, messages and pair."""
    if record.messages is None and record.pair is None:  # most records: no copy when already clean
        text = clean_text(record.text)
        return record if text == record.text else replace(record, text=text)
    messages = record.messages
    if messages is not None:
        messages = [{**turn, "content": clean_text(str(turn.get("content", "")))} for turn in messages]
    pair = record.pair
    if pair is not None:
        pair = (clean_text(pair[0]), clean_text(pair[1]))
        pair = pair if all(pair) else None
    return replace(record, text=clean_text(record.text), messages=messages, pair=pair)


def clean_records(
    records: Iterable[Record], min_chars: int = 20, report: DataReport | None = None
) -> list[Record]:
    """The records cleaned (:func:`clean_text`, also on ``messages`` and ``pair``), in order,
    without those left empty (or with an empty message), shorter than ``min_chars``
    characters, or equal to an earlier one; each drop is counted in ``report``."""
    keep = RecordFilter(min_chars, DataReport() if report is None else report)
    return [record for record in map(clean_record, records) if keep(record)]


def clean_chunk(records: list[Record]) -> list[Record]:
    """:func:`clean_record` over a list: the unit of work a cleaning process is given."""
    return [clean_record(record) for record in records]


class RecordFilter:
    """Whether a cleaned record is kept: not empty, at least ``min_chars`` long, not seen before.

    Remembers a 16-byte hash of each kept text, not the text, so memory stays small
    beside a large corpus. Each drop is counted in ``report``, each keep in ``records_kept``.
    """

    def __init__(self, min_chars: int, report: DataReport) -> None:
        self.min_chars, self.report = min_chars, report
        self.seen: set[bytes] = set()

    def __call__(self, record: Record) -> bool:
        reason = early_drop(record, self.min_chars)
        return self.admit(reason, text_hash(record.text) if reason is None else b"")

    def admit(self, reason: str | None, digest: bytes) -> bool:
        """The decision for a record whose :func:`early_drop` is ``reason`` and whose
        :func:`text_hash` is ``digest`` (worked out elsewhere, by a cleaning process, say)."""
        if reason is None:
            if digest not in self.seen:
                self.seen.add(digest)
                self.report.records_kept += 1
                return True
            reason = "duplicate"
        self.report.dropped[reason] += 1
        return False


def early_drop(record: Record, min_chars: int) -> str | None:
    """Why a cleaned record is dropped whatever came before it (``"empty"``, ``"too_short"``), or None."""
    if not record.text or (record.messages is not None and not all(t["content"] for t in record.messages)):
        return "empty"  # a conversation with a message left empty cannot be rendered as a chat
    if len(record.text) < min_chars:
        return "too_short"
    return None


def text_hash(text: str) -> bytes:
    """What exact-duplicate removal compares: a 16-byte BLAKE2b of the text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
