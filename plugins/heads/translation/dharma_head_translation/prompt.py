"""How a pair is laid out for the language model: ``Sanskrit: <source>\\nEnglish: <target><eos>``.

The source and the separator are tokenized apart, so a long source is cut without losing
the separator, and a prompt tokenizes the same in training and in generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dharma_kernel.head_data import IGNORE


@dataclass(frozen=True)
class Layout:
    source_language: str
    target_language: str

    def source_text(self, source: str) -> str:
        return f"{self.source_language}: {source}"

    def separator(self) -> str:
        return f"\n{self.target_language}:"

    def prompt_ids(self, source: str, tokenizer: Any, max_length: int) -> list[int]:
        """The prompt's tokens; the source keeps its first tokens so that the prompt fits in half of
        ``max_length`` (the other half is the target's)."""
        separator = _ids(tokenizer, self.separator())
        room = max(1, max_length // 2 - len(separator))
        return _ids(tokenizer, self.source_text(source))[:room] + separator

    def target_ids(self, target: str, tokenizer: Any, eos: int) -> list[int]:
        return _ids(tokenizer, f" {target}") + [eos]

    def example(
        self, source: str, target: str, tokenizer: Any, eos: int, max_length: int
    ) -> dict[str, list[int]]:
        """``input_ids`` prompt + target and ``labels`` that count the target tokens only."""
        prompt = self.prompt_ids(source, tokenizer, max_length)
        target_ids = self.target_ids(target, tokenizer, eos)[: max_length - len(prompt)]
        return {"input_ids": prompt + target_ids, "labels": [IGNORE] * len(prompt) + target_ids}


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
