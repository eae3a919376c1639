"""Sanskrit-English pairs: the seed formats, and a numbered plain-text translation aligned by verse."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dharma_kernel.data import DataReport
from dharma_kernel.data.pairs import read_pairs
from dharma_kernel.data.verse_translation import numbered_verses

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-data"

# Written for this test: the layout of the seed Gita translation, with made-up verses.
TRANSLATION = """======================================================================
SONG OF TESTS - Complete Text
======================================================================

CHAPTER 1
======================================================================

1. A prayer before the work, not a verse of it.

2. A second prayer.

CHAPTER 2
======================================================================

The teacher said:

1. The first verse opens the chapter. 1

p. 4

2-3. The second and third verses, translated together,

p. 5

[paragraph continues] run across a page. *

4. The fourth verse.

The end of chapter first, designated The Opening.

1:1 A footnote, not a verse.

1. The second chapter's first verse.

2. Its second verse.

The end of the second chapter, designated The Close.
"""


def corpus(verses: dict[tuple[int, int], str]) -> str:
    texts = [
        {"source": "गीतम् (Song of Tests)", "chapter": c, "verse": v, "sanskrit_original": s}
        for (c, v), s in verses.items()
    ]
    return json.dumps({"texts": texts}, ensure_ascii=False)


def test_numbered_verses_are_read_by_chapter(tmp_path):
    path = tmp_path / "song.txt"
    path.write_text(TRANSLATION)

    verses = [(v.chapter, v.first, v.last, v.text) for v in numbered_verses(path)]

    assert verses == [
        (1, 1, 1, "The first verse opens the chapter."),
        (1, 2, 3, "The second and third verses, translated together, run across a page."),
        (1, 4, 4, "The fourth verse."),
        (2, 1, 1, "The second chapter's first verse."),
        (2, 2, 2, "Its second verse."),
    ]


def test_a_translation_pairs_with_the_sanskrit_of_its_work(tmp_path):
    (tmp_path / "song").mkdir()
    (tmp_path / "song" / "song.txt").write_text(TRANSLATION)
    sanskrit = {(1, 1): "प्रथमः", (1, 2): "द्वितीयः", (1, 3): "तृतीयः", (1, 4): "चतुर्थः"}
    # chapter 2 counts one verse more in Sanskrit: that one is taken to open the chapter
    sanskrit |= {(2, 1): "प्रश्नः", (2, 2): "आदिः", (2, 3): "अन्तः"}
    (tmp_path / "corpus.json").write_text(corpus(sanskrit))

    pairs = [(p.source, p.target) for p in read_pairs([tmp_path])]

    assert pairs == [
        ("प्रथमः", "The first verse opens the chapter."),
        ("द्वितीयः तृतीयः", "The second and third verses, translated together, run across a page."),
        ("चतुर्थः", "The fourth verse."),
        ("आदिः", "The second chapter's first verse."),
        ("अन्तः", "Its second verse."),
    ]
    # named alone, the translation finds the corpus in the tree it sits in
    assert len(read_pairs([tmp_path / "song" / "song.txt"])) == 5


def test_verses_missing_from_the_sanskrit_are_left_out(tmp_path):
    (tmp_path / "song.txt").write_text(TRANSLATION)
    (tmp_path / "corpus.json").write_text(corpus({(1, 1): "प्रथमः", (1, 2): "द्वितीयः", (1, 4): "चतुर्थः"}))

    pairs = read_pairs([tmp_path])

    assert [p.target for p in pairs] == ["The first verse opens the chapter.", "The fourth verse."]


@pytest.mark.skipif(not SEED.is_dir(), reason=f"no seed data at {SEED}")
def test_seed_data_gives_sanskrit_english_pairs():
    report = DataReport()

    pairs = read_pairs([SEED], report=report)

    counts = Counter(Path(p.file).name for p in pairs)
    assert counts == {
        "bhagavad_gita.txt": 496,  # chapters 1-13, the rest are not in the file
        "complete_hindu_database.json": 59,
        "dharmic_emotional_wisdom.json": 25,
        "complete_training_data.json": 19,
        "complete_vedic_corpus.json": 11,
        "COMPLETE_PURE_SANSKRIT_CORPUS.json": 8,
    }
    assert report.problems == []
    first = next(p for p in pairs if p.file.endswith("bhagavad_gita.txt"))
    assert first.source.startswith("धृतराष्ट्र उवाच धर्मक्षेत्रे कुरुक्षेत्रे")
    assert first.target.startswith("Tell me, O Sanjaya! Assembled on Kurukshetra")
    # Gita 13: the corpus numbers Arjuna's opening question as verse 1, the translation does not
    sun = next(p for p in pairs if p.target.startswith("As the one sun illumines"))
    assert sun.source.startswith("यथा प्रकाशयत्येकः")
