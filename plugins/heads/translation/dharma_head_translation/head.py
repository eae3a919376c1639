"""The translation head: trains the language model on the target tokens and translates by generating."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import torch

from dharma_kernel.backbone import context_length
from dharma_kernel.data.pairs import read_pairs
from dharma_kernel.data.readers import HEAD_BYTES
from dharma_kernel.head_data import max_length_of
from dharma_kernel.protocol import HeadModule, HeadOutput, ModuleConfig, RecordError

from .metrics import translation_scores
from .prompt import Layout

MAX_NEW_TOKENS = 256  # the default longest translation when nothing says otherwise


class TranslationConfig(ModuleConfig):
    source_language: str = "Sanskrit"  # the names the prompt gives the two sides
    target_language: str = "English"
    num_beams: int = 1  # 1: greedy; a record's "beams" overrides it
    # Longest translation in tokens; a record's "max_new_tokens" overrides it. Left unset, fine-tuning
    # sets it to the longest training target in UTF-8 bytes (a byte-level token holds at least one).
    max_new_tokens: int | None = None


class Translation(HeadModule):
    """Source-to-target generation. A pair becomes ``Sanskrit: <source>\\nEnglish: <target><eos>``
    and the model's LM loss counts the target tokens only. The head has no weights: the whole
    model (backbone and modules) is what fine-tuning trains.

    Records: ``{"source", "target"}`` JSONL; any seed format with Sanskrit-English pairs
    (verse databases, scripture records, a numbered translation beside its Sanskrit corpus).
    """

    name = "translation"
    module_api = "1.0"
    Config = TranslationConfig
    inputs: ClassVar[tuple[str, ...]] = ("source",)
    targets: ClassVar[tuple[str, ...]] = ("target",)
    uses_lm_loss: ClassVar[bool] = True
    metric = "chrf"

    @property
    def layout(self) -> Layout:
        return Layout(self.config.source_language, self.config.target_language)

    @classmethod
    def read(cls, path: Path) -> list[dict[str, Any]] | None:
        if path.suffix.lower() == ".jsonl" and _mentions_target(path):
            return None  # our own records, read and checked by the kernel
        # anything else (the seed formats; a text corpus gives no pairs) through the data readers
        return [{"source": p.source, "target": p.target} for p in read_pairs([path])]

    @classmethod
    def fit_config(cls, config: ModuleConfig, records: list[dict[str, Any]]) -> ModuleConfig:
        if config.max_new_tokens is not None:
            return config
        longest = max(len(str(record["target"]).encode()) for record in records)
        return config.model_copy(update={"max_new_tokens": min(MAX_NEW_TOKENS, longest + 1)})

    def encode(self, record: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
        source = _text(record, "source")
        if record.get("target") is None:
            return {"input_ids": self.layout.prompt_ids(source, tokenizer, max_length)}
        target = _text(record, "target")
        return self.layout.example(source, target, tokenizer, _eos(tokenizer), max_length)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, **features: torch.Tensor
    ) -> HeadOutput:
        return HeadOutput(logits=hidden.new_zeros(0))  # the LM loss on the target tokens trains

    def predict(self, model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One translation per record, generated alone (no padding: a batch never changes a result)."""
        return [self.translate(model, tokenizer, record) for record in records]

    def translate(self, model: Any, tokenizer: Any, record: dict[str, Any]) -> dict[str, Any]:
        try:
            beams = int(record.get("beams", self.config.num_beams))
            wanted = int(record.get("max_new_tokens", self.config.max_new_tokens or MAX_NEW_TOKENS))
        except ValueError:
            raise RecordError("beams and max_new_tokens must be whole numbers") from None
        if beams < 1 or wanted < 1:
            raise RecordError(f"beams and max_new_tokens must be at least 1, not {beams} and {wanted}")
        prompt = self.layout.prompt_ids(_text(record, "source"), tokenizer, max_length_of(model))
        positions = context_length(model.config.text_config, default=len(prompt) + wanted)
        new_tokens = max(1, min(wanted, positions - len(prompt)))
        device = next(model.parameters()).device
        ids = torch.tensor([prompt], device=device)
        eos = _eos(tokenizer, model)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                num_beams=beams,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        generated = [int(t) for t in out[0, len(prompt) :] if int(t) != eos]
        return {"translation": tokenizer.decode(generated, skip_special_tokens=True).strip(), "beams": beams}

    def metrics(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, float]:
        return translation_scores(
            [p["translation"] for p in predictions], [str(r["target"]) for r in records]
        )

    def format_prediction(self, prediction: dict[str, Any]) -> str:
        return prediction["translation"]


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{key!r} should be a string, not {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"empty {key!r}: a translation record needs a non-empty source and target")
    return value.strip()


def _mentions_target(path: Path) -> bool:
    with path.open("rb") as file:
        return re.search(rb'"target"\s*:', file.read(HEAD_BYTES)) is not None


def _eos(tokenizer: Any, model: Any = None) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and model is not None:
        eos = getattr(model.config.text_config, "eos_token_id", None)
    if eos is None:
        raise RecordError("the tokenizer has no end-of-text token to end a translation with")
    return int(eos)
