"""Which packed rows each optimizer step reads: a pure function of (seed, step).

Every epoch is a fresh permutation of the rows drawn from ``seed`` and the epoch
number, so the data position is just the number of steps done: resuming at step
``s`` reads exactly what an uninterrupted run reads at ``s``.

One step reads ``world * grad_accum * batch_size`` rows. Micro-batch ``j`` of rank
``r`` is slot ``j * world + r`` of the step, so one process accumulating ``2k``
micro-batches reads the same rows as two processes accumulating ``k`` each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Windows:
    rows: int
    batch_size: int
    grad_accum: int
    world: int = 1
    rank: int = 0
    seed: int = 0

    @property
    def rows_per_step(self) -> int:
        return self.world * self.grad_accum * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        """Steps that read every row once; the last one wraps to the epoch's first rows."""
        return max(1, math.ceil(self.rows / self.rows_per_step))

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.rows, generator=generator)

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's ``grad_accum`` lists of row indices for optimizer step ``step`` (from 0)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.order(epoch).tolist()
        base = within * self.rows_per_step
        batches = []
        for j in range(self.grad_accum):
            start = base + (j * self.world + self.rank) * self.batch_size
            batches.append([order[(start + i) % self.rows] for i in range(self.batch_size)])
        return batches
