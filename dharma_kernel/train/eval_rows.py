"""The rows every evaluation of a run reads: at most ``train.eval_tokens`` tokens of the held-out
set, drawn once from ``train.seed``, so evaluations compare like with like and stay cheap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


class EvalRows:
    """``rows`` of ``data`` (in order), used as the data itself is (``len``, ``batch``)."""

    def __init__(self, data: Any, rows: Sequence[int]) -> None:
        self.data, self.rows = data, list(rows)
        self.refs = getattr(data, "refs", ())

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        return self.data.batch([self.rows[int(i)] for i in indices])


def eval_rows(data: Any, max_tokens: int, max_length: int, seed: int) -> Any:
    """``data`` itself when it holds at most ``max_tokens`` tokens (or ``max_tokens`` is 0), else
    ``ceil(max_tokens / max_length)`` of its rows drawn from ``seed``."""
    if data is None or not max_tokens or len(data) <= math.ceil(max_tokens / max_length):
        return data
    wanted = math.ceil(max_tokens / max_length)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
    rows = torch.randperm(len(data), generator=generator)[:wanted].sort().values
    return EvalRows(data, rows.tolist())
