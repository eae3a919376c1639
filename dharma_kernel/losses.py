"""Loss components and their aggregation.

total = lm_weight * lm + concept_weight * concept + every other named loss
(router balance, module-specific losses, head losses), each returned on its own.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over counted tokens, and how many were counted.

    Labels equal to -100 and padding positions (``attention_mask == 0``) never count.
    The count lets a trainer normalise by tokens across a whole accumulation window.
    """
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, -labels.shape[1] :] == 0, IGNORE)
    # Shift the labels, not the logits: slicing the [B, T, V] logits would copy them and their gradient.
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    count = (shifted != IGNORE).sum()
    total = F.cross_entropy(flat, shifted, ignore_index=IGNORE, reduction="sum")
    return total / count.clamp_min(1), count


def concept_losses(
    score: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per module, the binary cross-entropy of its activation scores against labels in {0, 1},
    averaged over the tokens where it counts: ``(loss [M], has [M])``.

    ``score``: ``[B, T, M]``; ``labels``: ``[B, T, M]``, or per sequence ``[B, M]``; -100 marks
    unknown. Only ``counted`` tokens (``[B, T, M]`` bool: real, and where the module ran) take
    part. ``has`` is False, and the loss 0, for a module where none does.
    All modules in one table, so a step costs a few ops, not a few per module.
    """
    if labels.dim() == 2:
        labels = labels[:, None, :]
    labels = labels.expand_as(score)
    keep = counted & (labels != IGNORE)
    # Written out rather than F.binary_cross_entropy, which raises on a NaN score: a diverged
    # step must reach the trainer as a non-finite loss, which it skips. In fp32 outside autocast,
    # as the scores are already probabilities. Tokens that do not count read 0.5, so whatever
    # their score is, it gives neither a loss nor a gradient.
    with torch.autocast(score.device.type, enabled=False):
        prob = torch.where(keep, score.float(), 0.5).clamp(1e-6, 1 - 1e-6)
        target, kept = labels.float(), keep.float()  # float arithmetic: no conversion per product
        yes, no = prob.log(), torch.log1p(-prob)  # log p and log(1 - p)
        loss = -(no + target * (yes - no)) * kept
        count = kept.sum((0, 1))
        return loss.sum((0, 1)) / count.clamp_min(1), count > 0


def routing_loss(
    evidence: torch.Tensor, hits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor
) -> torch.Tensor | None:
    """How well a router's logits ``[B, T, M]`` match the concept labels, at every real token.

    Two binary cross-entropies, averaged. ``evidence`` (the running maximum of ``hits`` over
    the document, see :mod:`~dharma_kernel.routing`) against the labels ("the concept so
    far"): routing takes the top evidence, so a token labelled with concept m goes to module
    m. And ``hits`` at the tokens where a label turns on (the concept's first term) against
    1, and where it is 0 against 0: the maximum alone would credit whichever token held it,
    not the term. Each is class-balanced per module (positives and negatives weigh half
    each): a concept is present at a few percent of the tokens, and an unweighted mean
    would teach the router that no concept is ever present. ``labels``: ``[B, T, M]``, or
    per sequence ``[B, M]`` (the evidence term only); -100 unknown. None when no token is
    labelled.
    """
    per_sequence = labels.dim() == 2
    if per_sequence:
        labels = labels[:, None, :].expand_as(evidence)
    keep = real[..., None] & (labels != IGNORE)
    if not torch.compiler.is_compiling() and not bool(keep.any()):  # traced: no host read, a zero loss
        return None
    with torch.autocast(evidence.device.type, enabled=False):
        positive = labels == 1
        loss = _balanced_bce(evidence.float(), positive, keep)
        if per_sequence:
            return loss
        onset = positive & ~F.pad(positive[:, :-1], (0, 0, 1, 0), value=False)
        # kept labels are 0 or 1: not positive is labelled 0
        return (loss + _balanced_bce(hits.float(), onset, keep & (~positive | onset))) / 2


def _balanced_bce(logits: torch.Tensor, positive: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy ``[B, T, M]`` -> scalar: per module the mean over its positive tokens and the
    mean over its negative ones, then the mean of all those means that have tokens."""
    target = positive.float()
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    # the two classes as float weights of one [2, B, T, M] table (0 or 1: sums are exact counts):
    # arithmetic in one dtype, where boolean masks each cost a conversion in every product and sum
    kept = keep.float()
    positives = kept * target
    weights = torch.stack([positives, kept - positives])
    count = weights.sum((1, 2))  # [2, M]
    mean = (loss * weights).sum((1, 2)) / count.clamp_min(1)  # 0 where a class has no token
    # weighted, not indexed by ``count > 0``: boolean indexing waits for the device (twice, with backward)
    return mean.sum() / count.clamp_max(1).sum().clamp_min(1)


def total_loss(components: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum of the components.

    ``lm`` and ``concept`` take ``weights["lm"]`` and ``weights["concept"]``, every
    ``router_balance@<layer>`` takes ``weights["router"]``, every ``routing@<layer>``
    ``weights["routing"]``, anything else weight 1.
    """
    # the components of each weight summed, then one product; all in the widest of their dtypes,
    # as one stack of them would be (a plugin's bf16 loss is not summed in bf16)
    dtype = functools.reduce(torch.promote_types, (value.dtype for value in components.values()))
    by_weight: dict[float, torch.Tensor] = {}
    for name, value in components.items():
        weight, value = weight_of(name, weights), value if value.dtype == dtype else value.to(dtype)
        by_weight[weight] = value if weight not in by_weight else by_weight[weight] + value
    total = None
    for weight, value in by_weight.items():
        term = value if weight == 1.0 else value * weight  # a product by a number is a few ops each
        total = term if total is None else total + term
    return total


def weight_of(name: str, weights: dict[str, float]) -> float:
    if name in ("lm", "concept"):
        return weights.get(name, 1.0)
    if name.startswith("router_balance@"):
        return weights.get("router", 0.01)
    if name.startswith("routing@"):
        return weights.get("routing", 1.0)
    return 1.0
