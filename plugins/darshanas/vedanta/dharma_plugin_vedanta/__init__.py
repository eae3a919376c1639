"""Vedanta: attends over the text so far and keeps a running summary of it."""

from __future__ import annotations

import torch
from pydantic import Field

from dharma_kernel.blocks import BottleneckAdapter, CausalAttention, ConceptDetector, RunningSummary
from dharma_kernel.protocol import DharmaModule, ModuleConfig, ModuleContext, ModuleOutput


class Vedanta(DharmaModule):
    family = "darshanas"
    name = "vedanta"
    module_api = "1.0"
    concepts = (
        "वेदान्त", "ब्रह्मन्", "आत्मन्", "माया", "उपनिषद्", "अद्वैत",
        "vedānta", "brahman", "ātman", "māyā", "upaniṣad", "advaita",
        "vedanta", "non-duality", "ultimate reality", "the self", "illusion", "upanishad",
    )  # fmt: skip

    class Config(ModuleConfig):
        heads: int = Field(2, ge=1)
        head_dim: int = Field(16, ge=1)
        feed_forward: int = Field(32, ge=1)
        summary: int = Field(16, ge=1)

    presets = {
        "tiny": {"heads": 2, "head_dim": 4, "feed_forward": 8, "summary": 4},
        "lite": {},
        "seed": {"heads": 12, "head_dim": 64, "feed_forward": 2048, "summary": 256},
    }

    def __init__(self, hidden_size: int, config: Config | None = None) -> None:
        super().__init__(hidden_size, config)
        c = self.config
        self.detector = ConceptDetector(hidden_size)
        self.attention = CausalAttention(hidden_size, c.heads, c.head_dim)
        self.summary = RunningSummary()
        self.summary_proj = BottleneckAdapter(hidden_size, c.summary)
        self.feed_forward = BottleneckAdapter(hidden_size, c.feed_forward)

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext) -> ModuleOutput:
        gate, _ = self.detector(hidden)
        mixed = hidden + self.attention(hidden, ctx) + self.summary_proj(self.summary(hidden, ctx))
        delta = mixed - hidden + self.feed_forward(mixed)
        return ModuleOutput(hidden=hidden + gate[..., None] * delta, score=gate)
