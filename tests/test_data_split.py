"""Holding out eval records: by hash, so the same record lands on the same side in every process."""

from __future__ import annotations

import json
import subprocess
import sys

from dharma_kernel.data import Record, split_records

RECORDS = [Record(f"record number {n} about karma and dharma", source="a.txt", index=n) for n in range(400)]


def held_out(records: list[Record], fraction: float, seed: int = 0) -> list[int]:
    return [record.index for record in split_records(records, fraction, seed)[1]]


def test_train_and_eval_partition_the_records_in_order():
    train, evaluation = split_records(RECORDS, 0.1, seed=0)

    assert sorted(train + evaluation, key=lambda r: r.index) == RECORDS
    assert [r.index for r in train] == sorted(r.index for r in train)
    assert [r.index for r in evaluation] == sorted(r.index for r in evaluation)


def test_the_split_is_pinned_so_it_never_changes_between_versions():
    # sha256 of "<seed>\n<text>": if this changes, every user's eval set changes with it.
    assert held_out(RECORDS[:40], 0.1, seed=0) == [2, 7, 9, 10, 13, 23, 27, 37, 38]
    assert held_out(RECORDS[:40], 0.1, seed=1) == [6, 8, 21, 28, 38]


def test_about_the_fraction_asked_for_is_held_out():
    many = [Record(f"text {n}") for n in range(4000)]

    assert [len(split_records(many, 0.1, seed)[1]) for seed in range(3)] == [395, 360, 401]


def test_another_process_with_another_hash_seed_splits_the_same_way():
    script = (
        "import json\n"
        "from dharma_kernel.data import Record, split_records\n"
        "records = [Record(f'record number {n} about karma and dharma', index=n) for n in range(400)]\n"
        "print(json.dumps([r.index for r in split_records(records, 0.1, 7)[1]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONHASHSEED": "4242", "PATH": ""},
        check=True,
    ).stdout

    assert json.loads(out) == held_out(RECORDS, 0.1, seed=7)


def test_a_records_side_depends_on_its_text_not_on_the_other_records():
    fewer = set(held_out(RECORDS[:100], 0.1))
    reordered = set(held_out(RECORDS[::-1], 0.1))

    assert fewer == {n for n in held_out(RECORDS, 0.1) if n < 100}
    assert reordered == set(held_out(RECORDS, 0.1))


def test_neither_side_is_left_empty_when_there_are_two_records():
    two = RECORDS[:2]

    assert [len(side) for side in split_records(two, 0.001, seed=0)] == [1, 1]
    assert [len(side) for side in split_records(two, 0.999, seed=0)] == [1, 1]
    assert [len(side) for side in split_records(RECORDS[:1], 0.5, seed=0)] in ([1, 0], [0, 1])


def test_no_fraction_holds_nothing_out():
    assert split_records(RECORDS, 0.0, seed=0) == (RECORDS, [])
    assert split_records([], 0.1, seed=0) == ([], [])
