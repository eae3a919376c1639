"""The best answer span from start and end logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Span", "best_span"]


@dataclass(frozen=True)
class Span:
    """Tokens ``first..last`` (inclusive); ``score`` = P(start = first) * P(end = last)."""

    first: int
    last: int
    score: float


def best_span(
    start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor, max_tokens: int
) -> Span | None:
    """The span of at most ``max_tokens`` context tokens with the highest start + end logit.

    All three tensors are ``[T]``; None when the mask holds no context token. The score is
    the product of the start and end probabilities, each a softmax over the context tokens.
    """
    allowed = context_mask.bool()
    if not allowed.any():
        return None
    start = torch.log_softmax(start_logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    end = torch.log_softmax(end_logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    length = start.shape[0]
    position = torch.arange(length, device=start.device)
    width = position[None, :] - position[:, None]  # last - first
    valid = (width >= 0) & (width < max_tokens) & allowed[:, None] & allowed[None, :]
    scores = (start[:, None] + end[None, :]).masked_fill(~valid, float("-inf"))
    flat = int(scores.flatten().argmax())
    first, last = divmod(flat, length)
    return Span(first, last, float(scores[first, last].exp()))
