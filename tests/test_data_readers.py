"""Reading every supported format into records: what becomes text, tags and pair, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dharma_kernel.data import DataReport, Record, read_records
from dharma_kernel.errors import DharmaError


def write(directory: Path, name: str, content: str | object) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, indent=2)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*lines: object) -> str:
    return "\n".join(
        line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines
    )


# --- plain text ---------------------------------------------------------------------------------


def test_txt_paragraphs_are_records_numbered_from_one(tmp_path):
    path = write(tmp_path, "a.txt", "First paragraph,\nstill first.\n\n\n  \nSecond one.\n")

    records = read_records([path])

    assert records == [
        Record("First paragraph,\nstill first.", source=str(path), index=1),
        Record("Second one.", source=str(path), index=2),
    ]


def test_txt_without_blank_lines_splits_at_underlined_and_boxed_headings(tmp_path):
    text = (
        "=====\nCHAPTER 1\n=====\nopening words\nKARMA\n-----\n• action\n• its fruit\n"
        "BHAKTI\n------\ndevotion\n"
    )
    path = write(tmp_path, "a.txt", text)

    assert [record.text for record in read_records([path])] == [
        "CHAPTER 1\nopening words",
        "KARMA\n• action\n• its fruit",
        "BHAKTI\ndevotion",
    ]


def test_txt_that_is_not_utf8_is_a_malformed_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    report = DataReport()

    assert read_records([path], report=report) == []
    assert (report.files_read, report.files_skipped) == (0, 1)
    assert report.problems == [(str(path), 0, "not UTF-8 text (byte 3 is 0xe9)")]
    with pytest.raises(DharmaError, match=rf"^{path}: not UTF-8 text"):
        read_records([path], strict=True)


# --- JSON Lines ---------------------------------------------------------------------------------

GOOD_LINES = (
    {"text": "Karma is action and its fruit.", "tags": ["karma"]},
    {"text": "[gita] Yoga is skill in action.", "category": "gita", "source": "scraped"},
    {"text": "Stringified tags.", "tags": "['dharma', 'seva']"},
    {
        "messages": [
            {"role": "user", "content": "What is ahimsa?"},
            {"role": "assistant", "content": "Non-harming."},
        ],
        "tags": ["ahimsa"],
    },
)


def test_jsonl_text_tags_category_and_conversations(tmp_path):
    path = write(tmp_path, "c.jsonl", jsonl(*GOOD_LINES, ""))

    records = read_records([path])

    assert [(r.index, r.text, r.tags) for r in records] == [
        (1, "Karma is action and its fruit.", ("karma",)),
        (2, "Yoga is skill in action.", ("gita",)),
        (3, "Stringified tags.", ("dharma", "seva")),
        (4, "User: What is ahimsa?\nAssistant: Non-harming.", ("ahimsa",)),
    ]
    assert records[3].messages == GOOD_LINES[3]["messages"]
    assert all(r.source == str(path) and r.pair is None for r in records)


BAD_LINES = (
    '{"text": "unterminated',  # line 2
    '["a list"]',  # line 3
    {"tags": ["karma"]},  # line 4
    {"text": 42},  # line 5
    {"text": "bad tags", "tags": "karma, dharma"},  # line 6
    {"messages": [{"role": "user"}]},  # line 7
)


def test_jsonl_malformed_lines_are_reported_with_line_numbers_and_skipped(tmp_path):
    path = write(tmp_path, "c.jsonl", jsonl(GOOD_LINES[0], *BAD_LINES, "", GOOD_LINES[1]))
    report = DataReport()

    records = read_records([path], report=report)

    assert [r.index for r in records] == [1, 9]
    assert [(index, reason) for _, index, reason in report.problems] == [
        (2, "invalid JSON at column 10: Unterminated string starting at"),
        (3, "expected a JSON object, not list"),
        (4, "needs a 'text' or a 'messages' field"),
        (5, "field 'text' should be a string, not int"),
        (6, "field 'tags' should be a list of strings, not 'karma, dharma'"),
        (7, "message 1 needs a string 'content'"),
    ]
    assert (report.files_read, report.records_read, report.dropped["malformed"]) == (1, 8, 6)


def test_strict_stops_at_the_first_malformed_record_naming_file_and_line(tmp_path):
    path = write(tmp_path, "c.jsonl", jsonl(GOOD_LINES[0], {"text": 42}, '{"text": '))

    with pytest.raises(DharmaError) as caught:
        read_records([path], strict=True)

    assert caught.value.message == f"{path}:2: field 'text' should be a string, not int"
    assert "--strict" in str(caught.value)


# --- the JSON layouts of the seed data ----------------------------------------------------------


def test_verse_database_gives_sanskrit_english_pairs(tmp_path):
    path = write(
        tmp_path,
        "db.json",
        {
            "metadata": {"total_texts": 3},
            "texts": [
                {"sanskrit": "सत्यमेव जयते", "english": "Truth alone triumphs", "category": "upanishads",
                 "metadata": "{'chapter': 3, 'verse': 1}"},
                {"sanskrit": "अहं ब्रह्मास्मि", "category": "upanishads"},
                {"sanskrit": "तत्त्वमसि", "english": "That thou art", "metadata": {"chapter": 6}},
            ],
        },
    )  # fmt: skip
    report = DataReport()

    records = read_records([path], report=report)

    assert [(r.index, r.text, r.tags, r.pair) for r in records] == [
        (1, "सत्यमेव जयते\nTruth alone triumphs", ("upanishads",), ("सत्यमेव जयते", "Truth alone triumphs")),
        (3, "तत्त्वमसि\nThat thou art", (), ("तत्त्वमसि", "That thou art")),
    ]
    assert report.problems == [(str(path), 2, "missing field 'english'")]


def test_training_data_scriptures_then_conversations_with_stringified_tags(tmp_path):
    turns = [{"role": "user", "content": "Who is Krishna?"}, {"role": "assistant", "content": "A teacher."}]
    conversation = {"messages": turns, "tags": "['qa']"}
    scripture = {
        "sanskrit": "योगः कर्मसु कौशलम्",
        "transliteration": "yogaḥ karmasu kauśalam",
        "english": "Yoga is skill in action.",
        "commentary": None,
        "category": "scripture",
        "tags": "['gita', 'yoga']",
    }
    path = write(
        tmp_path, "t.json", {"metadata": {}, "scriptures": [scripture], "conversations": [conversation]}
    )

    first, second = read_records([path])

    assert first.text == "योगः कर्मसु कौशलम्\nyogaḥ karmasu kauśalam\nYoga is skill in action."
    assert (first.tags, first.pair) == (
        ("gita", "yoga", "scripture"),
        ("योगः कर्मसु कौशलम्", "Yoga is skill in action."),
    )
    assert (second.index, second.text, second.tags) == (
        2,
        "User: Who is Krishna?\nAssistant: A teacher.",
        ("qa",),
    )


def test_conversation_list(tmp_path):
    turns = [{"role": "user", "content": "What is Om?"}, {"role": "assistant", "content": "The sound ॐ."}]
    path = write(tmp_path, "conv.json", [{"id": "c1", "messages": turns, "category": "qa"}, {"id": "c2"}])
    report = DataReport()

    records = read_records([path], report=report)

    assert [(r.text, r.tags, r.messages) for r in records] == [
        ("User: What is Om?\nAssistant: The sound ॐ.", ("qa",), turns)
    ]
    assert report.problems == [(str(path), 2, "needs a 'text' or a 'messages' field")]


def test_nested_vedic_corpus_tags_records_with_the_objects_they_sit_in(tmp_path):
    corpus = {
        "metadata": {"languages": ["sanskrit"]},
        "four_vedas": {
            "rig_veda": {
                "description": "hymns",
                "essential_mantras": [
                    {"mantra": "ॐ नमः शिवाय", "transliteration": "om namaḥ śivāya",
                     "translation": "Salutations to Shiva", "significance": "A mantra"},
                ],
            }
        },
        "principal_upanishads": {"kena": {"key_teachings": [{"sanskrit": "केनेषितं", "translation": 3}]}},
    }  # fmt: skip
    path = write(tmp_path, "vedic.json", corpus)
    report = DataReport()

    [record] = read_records([path], report=report)

    assert record.text == "ॐ नमः शिवाय\nom namaḥ śivāya\nSalutations to Shiva\nA mantra"
    assert (record.tags, record.pair) == (("four_vedas", "rig_veda"), ("ॐ नमः शिवाय", "Salutations to Shiva"))
    assert report.problems == [(str(path), 2, "field 'translation' should be a string, not int")]


def test_darshanas_one_record_per_school(tmp_path):
    schools = {
        "nyaya": {"founder": "Gautama", "core_philosophy": "Logic", "pramanas": ["Pratyaksha", "Anumana"]},
        "vedanta": {
            "core_philosophy": "Brahman",
            "sub_schools": [{"name": "Advaita", "teacher": "Shankara"}],
        },
    }
    path = write(tmp_path, "d.json", {"six_classical_schools": schools})

    records = read_records([path])

    assert [(r.text, r.tags) for r in records] == [
        (
            "Nyaya\nFounder: Gautama\nCore philosophy: Logic\nPramanas: Pratyaksha; Anumana",
            ("darshanas", "nyaya"),
        ),
        ("Vedanta\nCore philosophy: Brahman\nSub schools: Advaita - Shankara", ("darshanas", "vedanta")),
    ]


def test_emotional_wisdom_teachings_and_practices(tmp_path):
    teaching = {"verse": "समत्वं योग उच्यते", "translation": "Equanimity is yoga.", "source": "Gita 2.48",
                "context": "anger, balance", "practice": "Breathe."}  # fmt: skip
    data = {"emotions": {"anger": {"teachings": [teaching], "practices": ["Count to ten", "Forgive"]}}}
    path = write(tmp_path, "e.json", data)

    first, second = read_records([path])

    assert (first.text, first.tags) == ("समत्वं योग उच्यते\nEquanimity is yoga.\nBreathe.", ("anger", "balance"))
    assert first.pair == ("समत्वं योग उच्यते", "Equanimity is yoga.")
    assert (second.index, second.text, second.tags) == (
        2,
        "Practices for anger:\nCount to ten\nForgive",
        ("anger",),
    )


def test_pure_sanskrit_corpus_text_is_the_sanskrit_alone(tmp_path):
    texts = [
        {"sanskrit_original": "अथ योगानुशासनम्॥", "transliteration": "atha yogānuśāsanam", "category": "sutra"},
        {"sanskrit_original": "अग्निमीळे पुरोहितं", "english_meaning": "I praise Agni", "category": "veda"},
    ]
    path = write(tmp_path, "s.json", {"metadata": {"note": "Sanskrit only"}, "texts": texts})

    records = read_records([path])

    assert [(r.text, r.tags, r.pair) for r in records] == [
        ("अथ योगानुशासनम्॥", ("sutra",), None),
        ("अग्निमीळे पुरोहितं", ("veda",), ("अग्निमीळे पुरोहितं", "I praise Agni")),
    ]


def test_invalid_json_file_is_reported_with_its_line(tmp_path):
    path = write(tmp_path, "broken.json", '{"texts": [\n  {"sanskrit": "x", "english": "y"},\n]}')
    report = DataReport()

    assert read_records([path], report=report) == []
    assert report.problems == [(str(path), 0, "invalid JSON at line 3 column 1: Expecting value")]
    with pytest.raises(DharmaError, match=rf"^{path}: invalid JSON at line 3"):
        read_records([path], strict=True)


def test_json_of_an_unknown_layout_is_skipped_with_the_readers_tried(tmp_path):
    path = write(tmp_path, "other.json", {"rows": [1, 2]})
    report = DataReport()

    assert read_records([path], strict=True, report=report) == []
    [(_, index, reason)] = report.problems
    assert index == 0 and reason.startswith("no reader recognises the content of this .json file (tried ")


# --- paths --------------------------------------------------------------------------------------


def test_directories_are_read_recursively_in_sorted_order_without_hidden_files(tmp_path):
    for name in ("b.txt", "a/z.txt", "a/c.jsonl", ".hidden.txt", ".git/x.txt", "a/.cache/y.txt"):
        write(tmp_path, name, json.dumps({"text": name}) if name.endswith(".jsonl") else name)

    assert [r.text for r in read_records([tmp_path])] == ["a/c.jsonl", "a/z.txt", "b.txt"]


def test_globs_expand_and_each_file_is_read_once(tmp_path):
    for name in ("one.txt", "two.txt", "sub/three.txt", "four.md"):
        write(tmp_path, name, name)

    records = read_records([f"{tmp_path}/*.txt", tmp_path / "one.txt", f"{tmp_path}/**/three.txt"])

    assert [r.text for r in records] == ["one.txt", "two.txt", "sub/three.txt"]


def test_unknown_file_types_are_reported_and_skipped_even_when_strict(tmp_path):
    write(tmp_path, "notes.md", "# Notes")
    write(tmp_path, "ok.txt", "kept")
    report = DataReport()

    records = read_records([tmp_path], strict=True, report=report)

    assert [r.text for r in records] == ["kept"]
    assert (report.files_read, report.files_skipped) == (1, 1)
    assert report.problems == [
        (str(tmp_path / "notes.md"), 0, "unknown file type '.md'; readers exist for .json, .jsonl, .txt")
    ]


def test_a_missing_path_or_an_empty_glob_is_an_error(tmp_path):
    with pytest.raises(DharmaError, match="no such file or directory"):
        read_records([tmp_path / "nope.txt"])
    with pytest.raises(DharmaError, match="no files match this pattern"):
        read_records([f"{tmp_path}/*.jsonl"])


def test_a_record_placed_at_its_source_keeps_every_other_field():
    from dataclasses import fields, replace

    from dharma_kernel.data.records import Record

    record = Record("text", ("karma",), "a.jsonl", 1, [{"role": "user", "content": "text"}], ("sa", "en"))
    assert record.at("b.jsonl", 7) == replace(record, source="b.jsonl", index=7)
    assert len(fields(Record)) == 6  # a new field must be passed on by Record.at too
