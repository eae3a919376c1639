"""Sequence classification: a linear layer over the last real token (or the mean of the real tokens)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dharma_kernel.errors import DharmaError
from dharma_kernel.head_data import forward_inputs, max_length_of, pad_features, pad_id
from dharma_kernel.protocol import HeadModule, HeadOutput, ModuleConfig, RecordError


class Classification(HeadModule):
    name, module_api = "classification", "1.0"
    inputs, targets = ("text",), ("label",)
    metric = "accuracy"  # what fine-tuning keeps the best checkpoint by

    class Config(ModuleConfig):
        pooling: Literal["last", "mean"] = "last"
        class_weights: Literal["none", "balanced"] = "none"  # balanced: weight n / (classes * count)
        dropout: float = Field(0.0, ge=0, lt=1)
        labels: list[str] = []  # learned from the training data (sorted)
        weights: list[float] = []  # per label, learned with class_weights = "balanced"

    def __init__(self, hidden_size: int, config: Config | None = None) -> None:
        super().__init__(hidden_size, config)
        if len(self.config.labels) < 2:
            raise DharmaError(
                "classification: the head needs at least two labels",
                hint="dharma finetune learns them from the training data; or set labels in [[heads]] config.",
            )
        self.dropout = nn.Dropout(self.config.dropout)
        self.out = nn.Linear(hidden_size, len(self.config.labels))

    @classmethod
    def fit_config(cls, config: Config, records: list[dict[str, Any]]) -> Config:
        counts = Counter(str(record["label"]) for record in records)  # encode checks each label's type
        labels = list(config.labels) or sorted(counts)  # labels set in the config keep their order
        if unknown := sorted(set(counts) - set(labels)):
            raise RecordError(
                f"label {unknown[0]!r} is not one of the configured labels ({', '.join(labels)})"
            )
        if len(labels) < 2:
            raise RecordError(f"found only the label {labels[0]!r}; classification needs at least two")
        weights = []
        if config.class_weights == "balanced":
            weights = [len(records) / (len(labels) * max(counts[label], 1)) for label in labels]
        return config.model_copy(update={"labels": labels, "weights": weights})

    def encode(self, record: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
        if not isinstance(record["text"], str):
            raise RecordError(f"'text' must be a string, not {type(record['text']).__name__}")
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"][: max_length - 1]
        # End-of-text closes every record: one position that has read all of it, the same in each.
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_id(tokenizer)
        features: dict[str, Any] = {"input_ids": [*ids, end]}
        if record.get("label") is not None:
            label = _label(record)
            if label not in self.config.labels:
                known = ", ".join(self.config.labels)
                raise RecordError(f"label {label!r} is not one of the training labels ({known})")
            features["label"] = self.config.labels.index(label)
        return features

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, label: torch.Tensor | None = None
    ) -> HeadOutput:
        mask = (
            torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
        )
        mask = mask[:, -hidden.shape[1] :].to(hidden.dtype)
        if self.config.pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        else:  # the last real token, wherever the padding is
            last = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = self.out(self.dropout(pooled))
        losses = {}
        if label is not None:
            weight = torch.tensor(self.config.weights, device=logits.device) if self.config.weights else None
            losses["loss"] = F.cross_entropy(logits.float(), label, weight=weight)
        return HeadOutput(logits=logits, losses=losses)

    def predict(
        self, model: nn.Module, tokenizer: Any, records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        length = max_length_of(model)
        features = [self.encode({"text": r["text"]}, tokenizer, length) for r in records]
        out = forward_inputs(model, pad_features(features, pad_id(tokenizer)))
        probabilities = out.heads[self.name].logits.float().softmax(-1).cpu()
        labels = self.config.labels
        return [
            {
                "label": labels[int(row.argmax())],
                "probabilities": dict(zip(labels, row.tolist(), strict=True)),
            }
            for row in probabilities
        ]

    def metrics(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, float]:
        gold = [_label(record) for record in records]
        guessed = [p["label"] for p in predictions]
        correct = sum(g == p for g, p in zip(gold, guessed, strict=True))
        f1s = []
        for label in sorted(set(gold) | set(guessed)):
            tp = sum(g == p == label for g, p in zip(gold, guessed, strict=True))
            predicted, actual = guessed.count(label), gold.count(label)
            f1s.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
        return {"accuracy": correct / len(gold), "macro_f1": sum(f1s) / len(f1s)}

    def format_prediction(self, prediction: dict[str, Any]) -> str:
        ranked = sorted(prediction["probabilities"].items(), key=lambda item: -item[1])
        return "\n".join([prediction["label"], *(f"  {label}  {p:.3f}" for label, p in ranked)])


def _label(record: dict[str, Any]) -> str:
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RecordError(f"'label' must be a string or an integer, not {type(label).__name__}")
    return str(label)
