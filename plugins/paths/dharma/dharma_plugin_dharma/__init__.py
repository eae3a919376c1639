"""Dharma: a residual concept block that acts where it detects duty and right order."""

from __future__ import annotations

import torch
from pydantic import Field

from dharma_kernel.blocks import BottleneckAdapter, ConceptDetector
from dharma_kernel.protocol import DharmaModule, ModuleConfig, ModuleContext, ModuleOutput


class Dharma(DharmaModule):
    family = "paths"
    name = "dharma"
    module_api = "1.0"
    concepts = (
        "धर्म", "स्वधर्म", "ऋत", "कर्तव्य",
        "dharma", "svadharma", "ṛta", "kartavya",
        "duty", "righteousness", "right conduct", "cosmic order", "one's own path",
    )  # fmt: skip

    class Config(ModuleConfig):
        bottleneck: int = Field(32, ge=1)
        detectors: int = Field(2, ge=1)

    presets = {
        "tiny": {"bottleneck": 8, "detectors": 2},
        "lite": {},
        "seed": {"bottleneck": 1024, "detectors": 4},
    }

    def __init__(self, hidden_size: int, config: Config | None = None) -> None:
        super().__init__(hidden_size, config)
        self.detector = ConceptDetector(hidden_size, self.config.detectors)
        self.adapter = BottleneckAdapter(hidden_size, self.config.bottleneck)

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext) -> ModuleOutput:
        gate, _ = self.detector(hidden)
        return ModuleOutput(hidden=hidden + gate[..., None] * self.adapter(hidden), score=gate)
