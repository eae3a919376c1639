"""Reading a file and the fields of a record, with a reason for every way they can be wrong.

Our users' JSON often holds lists and dicts written out as Python literals
(``"['gita', 'yoga']"``); they are parsed with :func:`ast.literal_eval`, which
evaluates literals only, never code.
"""

from __future__ import annotations

import ast
import codecs
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .records import Record, render_messages
from .report import DataReport

__all__ = [
    "BadFile",
    "BadRecord",
    "ROLES",
    "TOO_DEEP",
    "build_each",
    "load_json",
    "messages_field",
    "object_record",
    "optional_text",
    "read_text",
    "record_tags",
    "require_list",
    "require_object",
    "tags_field",
    "text_field",
    "text_lines",
]


LINE_BYTES = 1 << 16  # a longer line is read, and becomes records, in pieces of this size
# Python's JSON parser recurses per level: thousands of nested brackets are damage, not data.
TOO_DEEP = "JSON nested too deeply to parse (thousands of levels of [ or {)"


class BadFile(ValueError):
    """A file a reader cannot use at all; the message says why."""


class BadRecord(ValueError):
    """A record a reader cannot use; the message says why."""


def read_text(path: Path) -> str:
    """The file as text (UTF-8, a leading byte-order mark dropped)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadFile(f"not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x})") from None
    except OSError as err:
        raise BadFile(f"cannot be read: {err.strerror}") from None


def text_lines(path: Path, limit: int = LINE_BYTES) -> Iterator[str]:
    """The file's lines as UTF-8 text (a leading byte-order mark dropped), read as a stream.

    A line longer than ``limit`` bytes comes in pieces, cut at its last space or tab
    where it has one, so memory follows the data, not its longest line.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed, carried = 0, ""
    try:
        with path.open("rb") as file:
            while piece := file.readline(limit):
                cut_short = len(piece) == limit and not piece.endswith(b"\n")  # the line goes on
                if consumed == 0 and piece.startswith(codecs.BOM_UTF8):
                    piece, consumed = piece[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
                pending = len(decoder.getstate()[0])  # bytes of a character cut at the last piece's end
                try:
                    text = carried + decoder.decode(piece)
                except UnicodeDecodeError as err:
                    at = consumed - pending + err.start
                    raise BadFile(f"not UTF-8 text (byte {at} is {err.object[err.start]:#04x})") from None
                consumed += len(piece)
                carried = ""
                if cut_short:
                    cut = max(text.rfind(" "), text.rfind("\t"))
                    if cut > 0:
                        text, carried = text[:cut], text[cut + 1 :]
                yield from text.splitlines()
            tail = carried + decoder.decode(b"", final=True)
    except UnicodeDecodeError:  # the file ends inside a character
        raise BadFile(f"not UTF-8 text (it ends inside a character, at byte {consumed})") from None
    except OSError as err:
        raise BadFile(f"cannot be read: {err.strerror}") from None
    if tail:
        yield from tail.splitlines()


def load_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise BadFile(f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise BadFile(TOO_DEEP) from None


def _literal(value: Any) -> Any:
    """``value``, or the Python literal a string spells (a list or dict written out as text)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "(", "{"):
        try:
            return ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def text_field(obj: dict[str, Any], key: str) -> str:
    """A required string field."""
    if key not in obj:
        raise BadRecord(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} should be a string, not {_type_name(value)}")
    return value


def optional_text(obj: dict[str, Any], key: str) -> str:
    """A string field that may be absent or null (then empty)."""
    return "" if obj.get(key) is None else text_field(obj, key)


def tags_field(obj: dict[str, Any], key: str = "tags") -> tuple[str, ...]:
    """A list of strings, or the same written out as a string; absent or null means none."""
    value = _literal(obj.get(key))
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(tag, str) for tag in value):
        raise BadRecord(f"field {key!r} should be a list of strings, not {obj[key]!r:.60}")
    return tuple(tag.strip() for tag in value if tag.strip())


def record_tags(obj: dict[str, Any], *extra: str) -> tuple[str, ...]:
    """The object's ``tags``, then its ``category``, then ``extra``; each once."""
    tags = [*tags_field(obj), optional_text(obj, "category").strip(), *extra]
    return tuple(dict.fromkeys(tag for tag in tags if tag))


def require_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRecord(f"expected a JSON object, not {_type_name(value)}")
    return value


def require_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadFile(f"{where} should be a list, not {_type_name(value)}")
    return value


ROLES = ("system", "user", "assistant")


def messages_field(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """A conversation: a non-empty list of ``{"role": str, "content": str}`` turns.

    Roles are ``system`` (at most one, first), ``user`` and ``assistant``; the first turn after
    the system message is the user's; every content has text; at least one turn is the
    assistant's (the turns a chat model is trained on).
    """
    turns = _literal(obj["messages"])
    if not isinstance(turns, list) or not turns:
        raise BadRecord("field 'messages' should be a non-empty list of turns")
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise BadRecord(f"message {number} should be an object, not {_type_name(turn)}")
        for key in ("role", "content"):
            if not isinstance(turn.get(key), str):
                raise BadRecord(f"message {number} needs a string {key!r}")
        role = turn["role"]
        if role not in ROLES:
            raise BadRecord(f"message {number} has role {role!r}; roles are {', '.join(ROLES)}")
        if not turn["content"].strip():
            raise BadRecord(f"message {number} ({role}) has empty content")
        if role == "system" and number != 1:
            raise BadRecord(f"message {number} is a system message; only the first message may be one")
    if not any(turn["role"] == "assistant" for turn in turns):
        raise BadRecord("the conversation has no assistant turn, so nothing to train a chat model on")
    opening = 2 if turns[0]["role"] == "system" else 1
    if turns[opening - 1]["role"] != "user":
        raise BadRecord(
            f"message {opening} is from the {turns[opening - 1]['role']}; "
            "a conversation starts with a user message (after an optional system message)"
        )
    return turns


def build_each(
    path: Path,
    items: Iterable[tuple[int, Any]],
    build: Callable[[Any], Record],
    report: DataReport,
) -> Iterator[Record]:
    """``build(item)`` for every numbered item; a :class:`BadRecord` is reported and skipped."""
    source = str(path)
    for index, item in items:
        try:
            record = build(item)
        except BadRecord as err:
            report.malformed(source, index, str(err))
            continue
        yield record.at(source, index)


def object_record(obj: Any) -> Record:
    """A ``{"text" | "messages", "tags"?, "category"?}`` object, as in ``.jsonl`` files.

    text: ``text``, or the rendered ``messages``; tags: ``tags`` then ``category``.
    """
    obj = require_object(obj)
    tags, category = record_tags(obj), optional_text(obj, "category").strip()
    messages = messages_field(obj) if "messages" in obj else None
    if "text" in obj:
        text = text_field(obj, "text")
        # Scraped records repeat their category as a "[category] " prefix: a label, not text.
        if category and text.startswith(f"[{category}]"):
            text = text[len(category) + 2 :].lstrip()
        return Record(text, tags, messages=messages)
    if messages is not None:
        return Record(render_messages(messages), tags, messages=messages)
    raise BadRecord("needs a 'text' or a 'messages' field")
