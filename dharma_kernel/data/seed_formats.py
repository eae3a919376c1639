"""Readers for the JSON layouts our first users' data comes in (see ``shared/seed-data``).

Each sniffs for the keys that mark its layout; :data:`dharma_kernel.data.readers.BUILTIN_READERS`
tries them most specific first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .fields import (
    BadFile,
    BadRecord,
    build_each,
    load_json,
    object_record,
    optional_text,
    record_tags,
    require_list,
    require_object,
    text_field,
)
from .records import Record
from .report import DataReport

__all__ = [
    "DarshanasReader",
    "EmotionalWisdomReader",
    "SanskritCorpusReader",
    "TrainingDataReader",
    "VedicCorpusReader",
    "VerseDatabaseReader",
]


def _has_keys(head: str, *keys: str) -> bool:
    return all(re.search(rf'"{key}"\s*:', head) for key in keys)


def _top_object(path: Path) -> dict[str, Any]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise BadFile(f"the top level should be an object, not {type(data).__name__}")
    return data


def _lines(*parts: str) -> str:
    return "\n".join(part.strip() for part in parts if part.strip())


def _pair(source: str, target: str) -> tuple[str, str] | None:
    return (source.strip(), target.strip()) if source.strip() and target.strip() else None


class VerseDatabaseReader:
    """``{"texts": [{"sanskrit", "english", "category", "metadata", ...}]}``, a verse database.

    text: the Sanskrit line, then the English; pair: (Sanskrit, English);
    tags: ``tags`` if any, then ``category``. ``metadata`` (chapter and verse numbers,
    an object or one written as a string) is not text and is not read.
    """

    name = "verse-database"
    suffixes = (".json",)

    def sniff(self, path: Path, head: str) -> bool:
        return _has_keys(head, "texts", "sanskrit", "english")

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        texts = require_list(_top_object(path).get("texts"), "'texts'")
        yield from build_each(path, enumerate(texts, 1), self._record, report)

    def _record(self, item: Any) -> Record:
        item = require_object(item)
        sanskrit, english = text_field(item, "sanskrit"), text_field(item, "english")
        return Record(_lines(sanskrit, english), record_tags(item), pair=_pair(sanskrit, english))


class SanskritCorpusReader:
    """``{"texts": [{"sanskrit_original", "category", "english_meaning"?, ...}]}``, Sanskrit only.

    text: ``sanskrit_original`` alone (the corpus is meant to be pure Sanskrit, so a
    transliteration is left out); pair: (Sanskrit, ``english_meaning``) where there is one;
    tags: ``tags`` if any, then ``category``.
    """

    name = "sanskrit-corpus"
    suffixes = (".json",)

    def sniff(self, path: Path, head: str) -> bool:
        return _has_keys(head, "texts", "sanskrit_original")

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        texts = require_list(_top_object(path).get("texts"), "'texts'")
        yield from build_each(path, enumerate(texts, 1), self._record, report)

    def _record(self, item: Any) -> Record:
        item = require_object(item)
        sanskrit, english = text_field(item, "sanskrit_original"), optional_text(item, "english_meaning")
        return Record(sanskrit.strip(), record_tags(item), pair=_pair(sanskrit, english))


class TrainingDataReader:
    """``{"scriptures": [...], "conversations": [...]}``; records numbered scriptures first.

    A scripture: text is ``sanskrit``, ``transliteration``, ``english``, ``commentary``
    on separate lines; pair: (Sanskrit, English); tags: ``tags`` (a list or one written
    as a string), then ``category``.
    A conversation: as a ``.jsonl`` record (``messages`` rendered, tags then category).
    """

    name = "training-data"
    suffixes = (".json",)

    def sniff(self, path: Path, head: str) -> bool:
        return re.search(r'"(scriptures|conversations)"\s*:\s*\[', head) is not None

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        data = _top_object(path)
        scriptures = require_list(data.get("scriptures", []), "'scriptures'")
        conversations = require_list(data.get("conversations", []), "'conversations'")
        items = [(self._scripture, item) for item in scriptures] + [
            (object_record, item) for item in conversations
        ]
        yield from build_each(path, enumerate(items, 1), lambda pair: pair[0](pair[1]), report)

    def _scripture(self, item: Any) -> Record:
        item = require_object(item)
        sanskrit, english = text_field(item, "sanskrit"), text_field(item, "english")
        text = _lines(
            sanskrit,
            optional_text(item, "transliteration"),
            english,
            optional_text(item, "commentary"),
        )
        return Record(text, record_tags(item), pair=_pair(sanskrit, english))


class EmotionalWisdomReader:
    """``{"emotions": {<emotion>: {"teachings": [...], "practices": [...]}}}``.

    A teaching: text is ``verse``, ``translation``, ``practice`` on separate lines;
    pair: (verse, translation); tags: the emotion, then the terms of ``context``.
    An emotion's practices: one record, ``"Practices for <emotion>:"`` and one practice
    a line; tags: the emotion. Records are numbered emotion by emotion, teachings first.
    """

    name = "emotional-wisdom"
    suffixes = (".json",)

    def sniff(self, path: Path, head: str) -> bool:
        return re.search(r'"emotions"\s*:\s*\{', head) is not None and _has_keys(head, "teachings")

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        emotions = _top_object(path).get("emotions")
        if not isinstance(emotions, dict):
            raise BadFile("'emotions' should be an object of emotions")
        items: list[tuple[str, str, Any]] = []
        for emotion, entry in emotions.items():
            teachings = entry.get("teachings", []) if isinstance(entry, dict) else None
            if not isinstance(teachings, list):
                items.append((emotion, "entry", entry))
                continue
            items += [(emotion, "teaching", teaching) for teaching in teachings]
            if "practices" in entry:
                items.append((emotion, "practices", entry["practices"]))
        yield from build_each(path, enumerate(items, 1), self._record, report)

    def _record(self, item: tuple[str, str, Any]) -> Record:
        emotion, kind, value = item
        if kind == "entry":
            raise BadRecord(f"emotion {emotion!r} should be an object with a list of 'teachings'")
        if kind == "practices":
            if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
                raise BadRecord(f"the practices of {emotion!r} should be a list of strings")
            return Record(_lines(f"Practices for {emotion}:", *value) if value else "", (emotion,))
        teaching = require_object(value)
        verse, translation = text_field(teaching, "verse"), text_field(teaching, "translation")
        context = [term.strip() for term in optional_text(teaching, "context").split(",")]
        tags = tuple(dict.fromkeys(tag for tag in (emotion, *context) if tag))
        text = _lines(verse, translation, optional_text(teaching, "practice"))
        return Record(text, tags, pair=_pair(verse, translation))


class DarshanasReader:
    """``{<group>: {<school>: {"core_philosophy", "founder", ...}}}``, schools of philosophy.

    One record per object holding ``core_philosophy``. text: the school's name, then
    one ``Field name: value`` line per field (a list joined with ``"; "``);
    tags: ``darshanas`` and the school's key. No pair.
    """

    name = "darshanas"
    suffixes = (".json",)

    def sniff(self, path: Path, head: str) -> bool:
        return _has_keys(head, "core_philosophy")

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        schools = [
            (name, school)
            for group in _top_object(path).values()
            if isinstance(group, dict)
            for name, school in group.items()
            if isinstance(school, dict) and "core_philosophy" in school
        ]
        yield from build_each(path, enumerate(schools, 1), self._record, report)

    def _record(self, item: tuple[str, dict[str, Any]]) -> Record:
        name, school = item
        lines = [name.replace("_", " ").title()]
        lines += [f"{key.replace('_', ' ').capitalize()}: {_render(value)}" for key, value in school.items()]
        return Record(_lines(*lines), ("darshanas", name))


def _render(value: Any) -> str:
    if isinstance(value, dict):
        return " - ".join(_render(part) for part in value.values())
    if isinstance(value, list):
        return "; ".join(_render(part) for part in value)
    return str(value)


class VedicCorpusReader:
    """Nested objects (``{"four_vedas": {"rig_veda": {"essential_mantras": [...]}}}`` and the like).

    One record per object holding ``translation`` and ``sanskrit`` or ``mantra``, in
    file order. text: the Sanskrit, ``transliteration``, ``translation``,
    ``significance`` on separate lines; pair: (Sanskrit, translation); tags: the keys
    of the objects it sits in (``four_vedas``, ``rig_veda``), not those of lists.
    """

    name = "vedic-corpus"
    suffixes = (".json",)

    def sniff(self, path: Path, head: str) -> bool:
        return _has_keys(head, "translation") and re.search(r'"(sanskrit|mantra)"\s*:', head) is not None

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        verses = list(_verses(_top_object(path), ()))
        yield from build_each(path, enumerate(verses, 1), self._record, report)

    def _record(self, item: tuple[tuple[str, ...], dict[str, Any]]) -> Record:
        path_keys, verse = item
        sanskrit = text_field(verse, "sanskrit" if "sanskrit" in verse else "mantra")
        translation = text_field(verse, "translation")
        text = _lines(
            sanskrit,
            optional_text(verse, "transliteration"),
            translation,
            optional_text(verse, "significance"),
        )
        return Record(text, path_keys, pair=_pair(sanskrit, translation))


def _verses(node: Any, keys: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    if isinstance(node, dict):
        if "translation" in node and ("sanskrit" in node or "mantra" in node):
            yield keys, node
            return
        for key, child in node.items():
            # a dict key names a text or a collection; a list key ("essential_mantras") only a shape
            yield from _verses(child, keys + (key,) if isinstance(child, dict) else keys)
    elif isinstance(node, list):
        for child in node:
            yield from _verses(child, keys)
