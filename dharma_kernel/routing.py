"""Concept evidence: a router's per-token concept logits, held for the rest of the document.

The concept labels say "the concept so far": from a document's first term of a concept on,
every token is labelled with it (see :func:`~dharma_kernel.concepts.token_labels`). A router
that reads one token's hidden state would have to rediscover at every token what came
before. Instead it scores each token (``hit``), and a module's evidence at token t is the
highest hit of that module at any real token of the same document up to t: causal, exact
under the KV cache (the evidence at the last cached position is all that carries over),
and reset at every end-of-text token, where packing joins documents. Routing takes the
top evidence, and the router is trained against the labels through it (``routing_loss``);
the gradient reaches the hit where the maximum was taken.
"""

from __future__ import annotations

import torch

# The evidence at padding: low enough never to win a max, finite so softmax stays defined.
PAD_LOGIT = -1e4


def document_starts(input_ids: torch.Tensor | None, eos_ids: int | list[int] | None) -> torch.Tensor | None:
    """``[B, T]`` bool: the end-of-text tokens, where a new document's evidence begins; None
    when there are no ids (``inputs_embeds``) or no end-of-text token (one document)."""
    if input_ids is None or eos_ids is None:
        return None
    eos = torch.as_tensor(eos_ids, device=input_ids.device).reshape(-1)
    return (input_ids[..., None] == eos).any(-1)  # not isin: ONNX has no searchsorted


def concept_evidence(
    hit: torch.Tensor,
    starts: torch.Tensor | None,
    real: torch.Tensor,
    previous: torch.Tensor | None = None,
    pairwise: bool = False,
) -> torch.Tensor:
    """``[B, T, M]``: per module, the running maximum of ``hit`` over the real tokens of each document.

    starts: ``[B, T]`` bool, where a document begins (it includes that token); None: none does.
    real: ``[B, T]`` bool, the tokens that count (padding never does).
    previous: ``[B, M]``, the evidence at the position before ``hit``'s first (cached generation).
    pairwise: the same maximum from a ``[T, T]`` mask instead of ``cummax``, for graph exporters
    (no scan, no bit casts); memory grows with ``T**2``.
    """
    value = hit.masked_fill(~real[..., None], PAD_LOGIT)
    batch, length, _ = value.shape
    if starts is None:
        starts = torch.zeros(batch, length, dtype=torch.bool, device=value.device)
    if previous is not None:
        value = torch.cat([previous[:, None].to(value.dtype), value], 1)
        starts = torch.cat([starts.new_zeros(batch, 1), starts], 1)
    document = torch.cumsum(starts.long(), 1)  # [B, T'] non-decreasing
    if pairwise:
        evidence = _pairwise_max(value, document)
    else:
        # One cummax over (document, value) keys: a later document's key beats every earlier one,
        # so the running maximum restarts there. Keys are exact integers; the values are gathered.
        key = (document[..., None] << 33) + _sortable(value.detach())
        _, index = torch.cummax(key, dim=1)
        evidence = value.gather(1, index)
    return evidence[:, 1:] if previous is not None else evidence


def _sortable(value: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in the same order (IEEE bits, negatives flipped)."""
    bits = value.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _pairwise_max(value: torch.Tensor, document: torch.Tensor) -> torch.Tensor:
    length = value.shape[1]
    position = torch.arange(length, device=value.device)
    earlier = position[None, :] <= position[:, None]  # [T, T]: s <= t
    same = document[:, :, None] == document[:, None, :]  # [B, T, T]
    allowed = (earlier & same)[..., None]  # [B, t, s, 1]
    spread = torch.where(allowed, value[:, None, :, :], torch.finfo(value.dtype).min)
    return spread.amax(2)
