"""Cleaning: noise out, Devanagari and IAST intact, short and duplicate records dropped and counted."""

from __future__ import annotations

import json
import unicodedata

import pytest

from dharma_kernel.data import DataReport, Record, clean_records, clean_text, read_records, render_messages


@pytest.mark.parametrize(
    ("noisy", "clean"),
    [
        ("Index of Words: <I>G</I> | <a href='x.html'>Next</a>", "Index of Words: G | Next"),
        ("line one<br/>line two<p>three</p><!-- nav -->", "line one\nline two\nthree"),
        (
            "The S&aacute;nkhya Aphorisms &amp; &#8220;notes&#8221;",
            "The Sánkhya Aphorisms & \u201cnotes\u201d",
        ),
        ("See https://sacred-texts.com/hin/index.htm and www.example.org/x now", "See and now"),
        ("Read [the Gita](https://example.org/gita) daily", "Read the Gita daily"),
        (
            "## Karma Yoga\n**Act** without *attachment* or __fear__",
            "Karma Yoga\nAct without attachment or fear",
        ),
        (
            "keep rishi_knowledge/astro_fundamentals.json and 2*3*4",
            "keep rishi_knowledge/astro_fundamentals.json and 2*3*4",
        ),
        ("• bullet\n* star bullet\n- dash bullet", "• bullet\n* star bullet\n- dash bullet"),
        ("Wow!!! Really??? etc....... yes,, no", "Wow! Really? etc... yes, no"),
        ("=====\nCHAPTER 7\n----------\nbody --- text", "CHAPTER 7\n\nbody --- text"),
        ("zero\u200bwidth\ufeff soft\u00adhyphen\x00 bell\x07 done", "zerowidth softhyphen bell done"),
        ("  spaced\t\tout  \r\n\r\n\r\n\n  lines \u00a0 here ", "spaced out\n\nlines here"),
        ("[paragraph]\n\n\n\n\nnext", "[paragraph]\n\nnext"),
    ],
)
def test_clean_text_removes_noise(noisy, clean):
    assert clean_text(noisy) == clean


def test_devanagari_and_iast_survive_cleaning_unchanged():
    verse = "कर्मण्येवाधिकारस्ते मा फलेषु कदाचन। मा कर्मफलहेतुर्भूर्मा ते सङ्गोऽस्त्वकर्मणि॥"
    iast = "karmaṇy-evādhikāras te mā phaleṣu kadācana; śrī-bhagavān uvāca"
    joiner = "क्\u200dष and र\u200cि"  # ZWJ/ZWNJ select conjunct forms in Devanagari

    assert clean_text(verse) == verse
    assert clean_text(iast) == iast
    assert clean_text(joiner) == joiner
    assert clean_text("<b>धर्म</b> &amp; dharma") == "धर्म & dharma"


def test_clean_text_normalises_to_nfc():
    decomposed = unicodedata.normalize("NFD", "Gītā, Pārtha, Sannyâsins")

    assert decomposed != "Gītā, Pārtha, Sannyâsins"
    assert clean_text(decomposed) == "Gītā, Pārtha, Sannyâsins"


def records(*texts: str) -> list[Record]:
    return [Record(text, source="f.txt", index=number) for number, text in enumerate(texts, 1)]


def test_clean_records_drops_and_counts_empty_short_and_duplicate_records():
    report = DataReport()
    given = records(
        "Dharma sustains the order of the world.",
        "  <p>\u200b</p>  ",
        "too short",
        "Dharma  sustains the <b>order</b> of the world.",  # equal once cleaned
        "Karma is action, and its fruit follows it.",
        "Dharma sustains the order of the world.",
    )

    kept = clean_records(given, report=report)

    assert [(r.index, r.text) for r in kept] == [
        (1, "Dharma sustains the order of the world."),
        (5, "Karma is action, and its fruit follows it."),
    ]
    assert report.dropped == {"empty": 1, "too_short": 1, "duplicate": 2, "malformed": 0}
    assert report.records_kept == 2


def test_min_chars_counts_characters_not_bytes():
    mantra = "ॐ नमः शिवाय ॐ नमः शिवाय"  # 23 characters, 63 bytes in UTF-8

    assert [r.text for r in clean_records(records(mantra), min_chars=23)] == [mantra]
    assert clean_records(records(mantra), min_chars=24) == []


def test_messages_and_pairs_are_cleaned_too():
    turns = [
        {"role": "user", "content": "What is <i>moksha</i>?"},
        {"role": "assistant", "content": "Liberation!!!"},
    ]
    record = Record(render_messages(turns), messages=turns, pair=("मोक्षः\u200b", "**Liberation**"))

    [cleaned] = clean_records([record])

    assert cleaned.text == "User: What is moksha?\nAssistant: Liberation!"
    assert [turn["content"] for turn in cleaned.messages] == ["What is moksha?", "Liberation!"]
    assert cleaned.pair == ("मोक्षः", "Liberation")


def test_a_pair_with_a_side_left_empty_is_dropped_but_the_record_kept():
    [cleaned] = clean_records([Record("A verse long enough to be kept.", pair=("<br>", "translation"))])

    assert cleaned.pair is None


def test_report_adds_up_and_summarises_in_numbers(tmp_path):
    lines = [
        {"text": "The Atman is neither born nor does it die."},
        {"text": "The Atman is neither born nor does it  die."},
        {"text": "short"},
        {"text": ""},
        "not json",
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    (tmp_path / "skip.csv").write_text("a,b")
    report = DataReport()

    clean_records(read_records([tmp_path], report=report), report=report)

    assert report.records_read == report.records_kept + sum(report.dropped.values()) == 5
    assert report.summary() == (
        "files: 1 read, 1 skipped\n"
        "records: 5 read, 1 kept\n"
        "dropped: 1 empty, 1 too_short, 1 duplicate, 1 malformed"
    )


def test_clean_text_skips_only_steps_that_would_change_nothing():
    # clean_text skips a step when the text lacks what its pattern needs; every step run
    # unconditionally must give the same text, on text dense in the marks the steps look for.
    import random
    from functools import reduce

    from dharma_kernel.data.clean import _STEPS

    pieces = [*"ab _*#=-~+!?,;:.<>/&[]()\n\t\r\x0b\x0c\x00\x1c\x85\xa0", "\u200b", "\u200d", "क", "  ",
              "https://", "www.", "<!--", "-->", "&amp;", "&nbsp;", "<br>", "<b>", "**", "__", "\u2028",
              "\u2029", "e\u0301", "\u3000", "](", "[x](http://a.b)", "....", "\n\n\n"]  # fmt: skip
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        every_step = reduce(lambda done, step: step[1](done), _STEPS, text)
        assert clean_text(text) == every_step, repr(text)
