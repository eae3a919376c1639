"""The rows a model trains on: what packing text (:mod:`.packing`) and conversations (:mod:`.chat`)
produce, and what the token shards (:mod:`.shards`) hold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..concepts import IGNORE


@dataclass
class PackedData:
    """Rows of ``max_length`` tokens, ready for :meth:`DharmaModel.forward`.

    input_ids, labels, attention_mask: ``[N, L]`` long. labels are input_ids with -100
    on padding and on a document's first token when another document precedes it in
    the row; in a conversation's row, -100 everywhere but on the assistant's tokens
    (the per-token mask of what is trained). attention_mask is 1 on real tokens (EOS
    included), 0 on padding.
    concept_labels: ``[N, L, M]`` int8 in {-100, 0, 1}, columns in ``refs`` order (see
    :func:`~dharma_kernel.concepts.token_labels`), -100 on EOS/BOS and padding; None
    without ``refs``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    concept_labels: torch.Tensor | None = None
    refs: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __repr__(self) -> str:
        return f"PackedData({len(self)} rows of {self.input_ids.shape[1]}, {self.tokens} tokens trained)"

    @property
    def tokens(self) -> int:
        """Label positions the LM loss trains on: labels != -100, the first column (never
        predicted: nothing precedes it in the row) left out."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def batch(self, indices: Sequence[int] | torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """The rows at ``indices`` as keyword arguments of :meth:`DharmaModel.forward`
        (``concept_labels`` as float, as the concept loss takes them)."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long)
        batch = {
            "input_ids": self.input_ids[indices],
            "attention_mask": self.attention_mask[indices],
            "labels": self.labels[indices],
        }
        if self.concept_labels is not None:
            batch["concept_labels"] = self.concept_labels[indices].float()
        return batch
