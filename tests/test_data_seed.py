"""The real files our first users have (``shared/seed-data`` beside the repository): read and cleaned.

The counts were measured on that data; a change in them means a reader or the
cleaning changed what users get.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dharma_kernel.data import BUILTIN_READERS, DataReport, clean_records, expand_paths, read_records
from dharma_kernel.data.readers import choose_reader

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-data"

pytestmark = pytest.mark.skipif(not SEED.is_dir(), reason=f"no seed data at {SEED}")

# file: (reader, records read, records kept by clean_records on that file alone)
FILES = {
    "complete_hindu_database.json": ("verse-database", 59, 58),
    "complete_scriptures/gita/bhagavad_gita.txt": ("text", 1507, 1049),
    "emotional/dharmic_emotional_wisdom.json": ("emotional-wisdom", 35, 35),
    "knowledge/complete_vedic_corpus.json": ("vedic-corpus", 12, 12),
    "knowledge/six_darshanas_complete.json": ("darshanas", 6, 6),
    "master_corpus/complete_dharmic_corpus.txt": ("text", 126, 125),
    "pure_sanskrit_corpus/COMPLETE_PURE_SANSKRIT_CORPUS.json": ("sanskrit-corpus", 828, 812),
    "training/complete_corpus/corpus.jsonl": ("jsonl", 1958, 1590),
    "training/complete_training_data.json": ("training-data", 26, 26),
    "training/dharmic_conversations.json": ("json-records", 7, 7),
}


def test_every_seed_file_is_read_by_its_reader():
    files = [path.relative_to(SEED).as_posix() for path in expand_paths([SEED])]
    assert files == sorted(FILES)
    chosen = {name: choose_reader(SEED / name, list(BUILTIN_READERS))[0] for name in FILES}
    assert {name: reader.name for name, reader in chosen.items() if reader} == {
        name: reader for name, (reader, _, _) in FILES.items()
    }


@pytest.mark.parametrize("name", sorted(FILES))
def test_record_counts_per_file(name):
    report = DataReport()

    kept = clean_records(read_records([SEED / name], strict=True, report=report), report=report)

    _, read, kept_count = FILES[name]
    assert (report.records_read, len(kept), report.problems) == (read, kept_count, [])


def test_the_noisy_scraped_corpus_is_cleaned():
    report = DataReport()

    kept = clean_records(
        read_records([SEED / "training/complete_corpus/corpus.jsonl"], report=report), report=report
    )

    assert report.dropped == {"empty": 0, "too_short": 2, "duplicate": 366, "malformed": 0}
    assert len({record.text for record in kept}) == len(kept) == 1590
    assert not any(
        marker in record.text for record in kept for marker in ("<I>", "&Acirc;", "https://", "====")
    )
    assert not any(record.text.startswith(f"[{tag}]") for record in kept for tag in record.tags)
    assert {tag for record in kept for tag in record.tags} == {
        "gita",
        "mass_download",
        "puranas",
        "upanishads",
        "yoga_sutras",
    }


def test_the_verse_database_yields_sanskrit_english_pairs():
    records = read_records([SEED / "complete_hindu_database.json"])

    pairs = [record.pair for record in records]
    assert len(pairs) == 59 and all(pairs)
    assert pairs[2] == (
        "कर्मण्येवाधिकारस्ते मा फलेषु कदाचन",
        "You have a right to perform your duty, but never to the fruits of action",
    )
    assert all("\u0900" <= sanskrit[0] <= "\u097f" and english.isascii() for sanskrit, english in pairs)


def test_the_whole_seed_directory():
    report = DataReport()

    kept = clean_records(read_records([SEED], strict=True, report=report), report=report)

    assert len(kept) == 3713
    assert (
        sum(record.pair is not None for record in kept) == 122
    )  # 123 read; one verse is shorter than 20 characters
    # the conversation list repeats the conversations of the training data
    assert report.summary() == (
        "files: 10 read, 0 skipped\n"
        "records: 4564 read, 3713 kept\n"
        "dropped: 0 empty, 439 too_short, 412 duplicate, 0 malformed"
    )
