"""Which rows each step reads: every row once per epoch, the same for any process layout."""

from __future__ import annotations

import pytest

from dharma_kernel.train.windows import Windows


def rows_of(windows: Windows, step: int) -> list[int]:
    return [row for batch in windows.micro_batches(step) for row in batch]


def test_an_epoch_reads_every_row_once():
    windows = Windows(rows=24, batch_size=2, grad_accum=3, seed=7)
    assert windows.steps_per_epoch == 4
    epoch = [row for step in range(4) for row in rows_of(windows, step)]
    assert sorted(epoch) == list(range(24))
    second = [row for step in range(4, 8) for row in rows_of(windows, step)]
    assert sorted(second) == list(range(24)) and second != epoch  # a fresh order each epoch


def test_the_last_step_of_an_epoch_wraps_to_its_first_rows():
    windows = Windows(rows=5, batch_size=2, grad_accum=1, seed=0)
    assert windows.steps_per_epoch == 3
    order = windows.order(0).tolist()
    assert rows_of(windows, 2) == [order[4], order[0]]


@pytest.mark.parametrize("step", [0, 1, 5, 11])
def test_two_processes_read_what_one_reads_with_doubled_accumulation(step):
    one = Windows(rows=40, batch_size=2, grad_accum=4, seed=3)
    ranks = [Windows(rows=40, batch_size=2, grad_accum=2, world=2, rank=r, seed=3) for r in (0, 1)]
    single = one.micro_batches(step)
    # micro-batch j of rank r is the single process's micro-batch j * world + r
    for r, windows in enumerate(ranks):
        for j, batch in enumerate(windows.micro_batches(step)):
            assert batch == single[j * 2 + r]


def test_the_position_is_the_step_alone():
    a, b = (
        Windows(rows=30, batch_size=3, grad_accum=2, seed=1),
        Windows(rows=30, batch_size=3, grad_accum=2, seed=1),
    )
    assert [a.micro_batches(s) for s in range(12)] == [b.micro_batches(s) for s in range(12)]
    assert Windows(rows=30, batch_size=3, grad_accum=2, seed=2).micro_batches(0) != a.micro_batches(0)
