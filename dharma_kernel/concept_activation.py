"""How each module's activation score meets the concept labels, over the eval tokens.

Two views from the same forward passes:

- the report's heatmap: each module's mean activation on the tokens labelled with each
  concept. Columns are the concepts of the model's modules (``concept_labels`` has one
  column per module ref) plus ``none``: tokens labelled with no concept. A module that
  specialises shows a bright cell on its own concept and dark ones elsewhere.
- detection: per module, the ROC-AUC of its score at every real token against that
  token's label for its concept (the chance that a random positive token outscores a
  random negative one), from histograms of the scores, so that batches and processes
  add up and memory does not grow with the data.

The trainer fills one table per evaluation and logs it to metrics.jsonl as
``{"step": N, "activation": table.record()}``; ``dharma eval`` prints it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

NONE = "none"
IGNORE = -100
# An AUC needs this many tokens of each class; fewer and it is reported as '-' with the counts.
MIN_TOKENS = 20
# Scores are binned on the logit scale, where sigmoid outputs spread evenly: 4096 bins over
# [-16, 16] tell apart probabilities 0.2% apart near 0.5 and 1e-7 apart near 0. Ties within
# a bin count half, as tied scores do in the rank statistic.
BINS, LOGIT_RANGE = 4096, 16.0


@dataclass
class ModuleAuc:
    """One module's detection: AUC (None when it cannot be measured, with ``reason``) and its base."""

    auc: float | None
    positives: int
    negatives: int
    reason: str | None = None

    def record(self) -> dict[str, Any]:
        return asdict(self)


class ConceptActivation:
    """Running sums of module activation by concept and score histograms; add batches, then read
    :meth:`record`."""

    def __init__(self, refs: Sequence[str]) -> None:
        self.refs = list(refs)
        self.sums = torch.zeros(len(self.refs), len(self.refs) + 1, dtype=torch.float64)
        self.tokens = torch.zeros(len(self.refs) + 1, dtype=torch.float64)
        # [M, 2, BINS]: per module, how many negative (0) and positive (1) tokens scored in each bin
        self.histogram = torch.zeros(len(self.refs), 2, BINS, dtype=torch.float64)

    def add(self, scores: dict[str, torch.Tensor], concept_labels: torch.Tensor, attention_mask: Any) -> None:
        """One batch: ``scores[ref]`` ``[B, T]``, ``concept_labels`` ``[B, T, M]`` (or per sequence
        ``[B, M]``) in ``refs`` order, -100 where unknown."""
        real = attention_mask.detach().cpu().bool()
        labels = concept_labels.detach().cpu()
        if labels.dim() == 2:
            labels = labels[:, None, :].expand(*real.shape, len(self.refs))
        labels = labels[:, -real.shape[1] :]
        present = (labels == 1) & real[..., None]  # [B, T, M]
        unlabelled = real & (labels == 0).all(-1)  # known tokens where no concept is present
        columns = torch.cat([present, unlabelled[..., None]], -1).to(torch.float64)  # [B, T, M+1]
        self.tokens += columns.sum((0, 1))
        known = real[..., None] & (labels != IGNORE)
        for row, ref in enumerate(self.refs):
            if ref not in scores:
                continue
            score = scores[ref].detach().cpu().to(torch.float64)
            self.sums[row] += (score[..., None] * columns).sum((0, 1))
            keep = known[..., row]
            bins = _bin(score[keep])
            positive = (labels[..., row][keep] == 1).long()
            self.histogram[row] += torch.bincount(positive * BINS + bins, minlength=2 * BINS).view(2, BINS)

    def state(self) -> list[torch.Tensor]:
        """The totals, for summing over processes (``Distributed.sum``) and :meth:`merge`."""
        return [self.sums, self.tokens, self.histogram]

    def merge(self, sums: torch.Tensor, tokens: torch.Tensor, histogram: torch.Tensor | None = None) -> None:
        """Replace the totals with ones summed over processes."""
        self.sums, self.tokens = sums.cpu().to(torch.float64), tokens.cpu().to(torch.float64)
        if histogram is not None:
            self.histogram = histogram.cpu().to(torch.float64)

    def auc(self) -> dict[str, ModuleAuc]:
        """Per module ref, its detection AUC over every labelled real token."""
        return {ref: _auc(self.histogram[row]) for row, ref in enumerate(self.refs)}

    def record(self) -> dict[str, Any]:
        """JSON-ready: ``mean[i][j]`` is module ``refs[i]`` on ``concepts[j]`` (None where no token had
        it); ``auc``: per module, :class:`ModuleAuc` as a dict; ``auc_median``: their median (None
        when no module has one)."""
        concepts = [*self.refs, NONE]  # a module's concept goes by its ref: names repeat across families
        mean = [
            [
                None if n == 0 else float(s / n)
                for s, n in zip(row.tolist(), self.tokens.tolist(), strict=True)
            ]
            for row in self.sums
        ]
        aucs = self.auc()
        return {
            "modules": self.refs,
            "concepts": concepts,
            "tokens": [int(n) for n in self.tokens.tolist()],
            "mean": mean,
            "diagonal": diagonal_share(mean),
            "auc": {ref: value.record() for ref, value in aucs.items()},
            "auc_median": median_auc(aucs.values()),
        }


def diagonal_share(mean: list[list[float | None]]) -> float | None:
    """The heatmap's diagonal: the share of modules whose mean activation is highest on their own
    concept (among the concepts the eval tokens have; ``none`` left out). None when no module's
    own concept occurs."""
    wins = [
        row[i] >= max(v for v in row[:-1] if v is not None)
        for i, row in enumerate(mean)
        if row[i] is not None
    ]
    return sum(wins) / len(wins) if wins else None


def median_auc(values: Any) -> float | None:
    """The median of the measured AUCs (macro: every module counts once); None if none was measured."""
    measured = [v.auc for v in values if v.auc is not None]
    return statistics.median(measured) if measured else None


def _bin(score: torch.Tensor) -> torch.Tensor:
    p = score.clamp(1e-12, 1 - 1e-12)
    logit = (torch.log(p) - torch.log1p(-p)).clamp(-LOGIT_RANGE, LOGIT_RANGE)
    return ((logit + LOGIT_RANGE) * (BINS / (2 * LOGIT_RANGE))).long().clamp(0, BINS - 1)


def _auc(histogram: torch.Tensor) -> ModuleAuc:
    """Mann-Whitney AUC from ``[2, BINS]`` counts of negative and positive tokens per score bin."""
    negative, positive = histogram[0], histogram[1]
    n, p = int(negative.sum()), int(positive.sum())
    if p < MIN_TOKENS or n < MIN_TOKENS:
        counts = ((p, "positive"), (n, "negative"))
        few = [f"{count} {name} tokens" for count, name in counts if count < MIN_TOKENS]
        return ModuleAuc(None, p, n, f"{' and '.join(few)} (an AUC needs {MIN_TOKENS} of each)")
    below = torch.cumsum(negative, 0) - negative  # negatives in lower bins than each bin
    wins = float((positive * (below + negative / 2)).sum())
    value = wins / (p * n)
    return ModuleAuc(value if math.isfinite(value) else None, p, n)
