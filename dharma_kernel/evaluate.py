"""Evaluation: perplexity, and how well each module's activation score separates text about its concept."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .concept_activation import ConceptActivation, ModuleAuc
from .concepts import encode
from .errors import DharmaError


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels`` in {0, 1}; None with one class only.

    The Mann-Whitney rank statistic: the chance a random positive outscores a random
    negative, ties counting half (tied scores share their average rank).
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    if any(label not in (0, 1) for label in labels):
        raise ValueError("labels must be 0 or 1")
    positives = sum(labels)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    positive_ranks = sum(rank for rank, label in zip(ranks, labels, strict=True) if label == 1)
    return (positive_ranks - positives * (positives + 1) / 2) / (positives * negatives)


def _scores(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    output = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    )
    return {ref: score.float().cpu() for ref, score in (output.module_scores or {}).items()}


def activation_auc(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, ModuleAuc]:
    """Per module ref, the ROC-AUC of its activation score at every labelled real token against the
    token's label for its concept (see :class:`~dharma_kernel.concept_activation.ConceptActivation`).

    ``batches`` come from :func:`~dharma_kernel.concepts.label_batch` with columns in
    ``model.module_refs`` order; padding and tokens labelled -100 have no say.
    """
    table = ConceptActivation(model.module_refs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                table.add(_scores(model, batch), batch["concept_labels"], batch["attention_mask"])
    finally:
        model.train(was_training)
    return table.auc()


def mean_activation(
    model: Any, texts: Sequence[str], tokenizer: Any, ref: str, max_length: int = 256
) -> float:
    """Mean activation score of module ``ref`` over the text tokens of ``texts`` (not padding or special)."""
    if ref not in model.module_refs:
        raise DharmaError(f"module '{ref}' is not in this model; it has: {', '.join(model.module_refs)}")
    batch = encode(texts, tokenizer, max_length)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            score = _scores(model, batch)[ref]
    finally:
        model.train(was_training)
    text = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    for row, offsets in enumerate(batch["offsets"]):
        text[row, : len(offsets)] = torch.tensor([end > start for start, end in offsets])
    return score[text].mean().item()


@torch.no_grad()
def lm_totals(
    model: Any,
    data: Any,
    batch_size: int,
    rows: Sequence[int] | None = None,
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    activation: Any | None = None,
    advance: Callable[[int], None] | None = None,
) -> tuple[float, float]:
    """Summed next-token loss and the number of tokens it covers, over ``rows`` of packed ``data``.

    Sums rather than a mean, so processes holding different rows can add theirs up.
    ``activation`` (a :class:`~dharma_kernel.concept_activation.ConceptActivation`), when
    given, also collects module activation by concept from the same forward passes.
    ``advance(n)`` is called as each batch of ``n`` rows is done (a progress bar).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = list(range(len(data))) if rows is None else list(rows)
    loss_sum = count = 0.0
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = data.batch(chunk)
            concept_labels = batch.pop("concept_labels", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            with precision():
                out = model(**batch, use_cache=False)
            if activation is not None and concept_labels is not None and out.module_scores:
                activation.add(out.module_scores, concept_labels, batch["attention_mask"])
            loss_sum += float(out.losses["lm"]) * float(out.lm_tokens)
            count += float(out.lm_tokens)
            if advance is not None:
                advance(len(chunk))
    finally:
        model.train(was_training)
    return loss_sum, count


def eval_length(model: Any, asked: int | None = None) -> int:
    """Tokens per packed sequence for evaluating ``model``: ``asked``, else the length it was
    trained at (its manifest's ``data.max_length``), never beyond the positions it has."""
    from .backbone import context_length
    from .head_data import max_length_of

    positions = context_length(model.config.text_config, default=2**31)
    if asked is None:
        return min(max_length_of(model), positions)
    if asked > positions:
        raise DharmaError(
            f"--max-length {asked} is more than the model's {positions} positions",
            hint=f"Use --max-length {positions} or less (or leave it out: the model's trained length).",
        )
    return asked


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped where it would overflow."""
    return math.exp(min(loss, 50.0))
