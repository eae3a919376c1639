"""Each module's mean activation on the tokens labelled with each concept: the report's heatmap.

Columns are the concepts of the model's modules (``concept_labels`` has one column per
module ref) plus ``none``: tokens labelled with no concept. A module that specialises
shows a bright cell on its own concept and dark ones elsewhere. The trainer fills one
table per evaluation, in the same forward passes as the eval loss, and logs it to
metrics.jsonl as ``{"step": N, "activation": table.record()}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

NONE = "none"


class ConceptActivation:
    """Running sums of module activation by concept; add batches, then read :meth:`record`."""

    def __init__(self, refs: Sequence[str]) -> None:
        self.refs = list(refs)
        self.sums = torch.zeros(len(self.refs), len(self.refs) + 1, dtype=torch.float64)
        self.tokens = torch.zeros(len(self.refs) + 1, dtype=torch.float64)

    def add(self, scores: dict[str, torch.Tensor], concept_labels: torch.Tensor, attention_mask: Any) -> None:
        """One batch: ``scores[ref]`` ``[B, T]``, ``concept_labels`` ``[B, T, M]`` in ``refs`` order."""
        labels = concept_labels.detach().cpu()
        real = attention_mask.detach().cpu().bool()
        present = (labels == 1) & real[..., None]  # [B, T, M]
        unlabelled = real & (labels == 0).all(-1)  # known tokens where no concept is present
        columns = torch.cat([present, unlabelled[..., None]], -1).to(torch.float64)  # [B, T, M+1]
        self.tokens += columns.sum((0, 1))
        for row, ref in enumerate(self.refs):
            if ref in scores:
                score = scores[ref].detach().cpu().to(torch.float64)
                self.sums[row] += (score[..., None] * columns).sum((0, 1))

    def merge(self, sums: torch.Tensor, tokens: torch.Tensor) -> None:
        """Replace the totals with ones summed over processes (see ``Distributed.sum``)."""
        self.sums, self.tokens = sums.cpu().to(torch.float64), tokens.cpu().to(torch.float64)

    def record(self) -> dict[str, Any]:
        """JSON-ready: ``mean[i][j]`` is module ``refs[i]`` on ``concepts[j]``; None where no token had it."""
        concepts = [*self.refs, NONE]  # a module's concept goes by its ref: names repeat across families
        mean = [
            [
                None if n == 0 else float(s / n)
                for s, n in zip(row.tolist(), self.tokens.tolist(), strict=True)
            ]
            for row in self.sums
        ]
        return {
            "modules": self.refs,
            "concepts": concepts,
            "tokens": [int(n) for n in self.tokens.tolist()],
            "mean": mean,
        }
