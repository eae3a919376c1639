"""Prana: breath and vital energy. Reads the text so far through a causal running summary.

Written as a whole-sequence ``forward`` (not token-wise): the detector gates a gated
residual block of each token plus a projection of the running summary of the tokens
up to it, so "the breath so far" colours each position without seeing later ones.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from dharma_kernel.blocks import ConceptDetector, GatedResidual, RunningSummary, zero_init
from dharma_kernel.protocol import DharmaModule, ModuleConfig, ModuleContext, ModuleOutput


class Prana(DharmaModule):
    family = "energy"
    name = "prana"
    module_api = "1.0"
    concepts = (
        "प्राण", "प्राणायाम", "श्वास", "वायु",
        "prāṇa", "prāṇāyāma", "śvāsa", "vāyu",
        "prana", "pranayama", "breath", "breathing", "vital energy", "life force",
    )  # fmt: skip

    class Config(ModuleConfig):
        inner: int = Field(16, ge=1)  # width of the gated residual block
        detectors: int = Field(2, ge=1)

    presets: ClassVar[dict] = {"tiny": {"inner": 8}, "seed": {"inner": 1024, "detectors": 4}}

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        self.detector = ConceptDetector(hidden_size, self.config.detectors)
        self.block = GatedResidual(hidden_size, self.config.inner)
        self.summary = RunningSummary()
        self.norm = nn.LayerNorm(hidden_size)
        self.from_summary = zero_init(nn.Linear(hidden_size, hidden_size))

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext) -> ModuleOutput:
        gate, _ = self.detector(hidden, ctx)
        so_far = self.summary(hidden, ctx)  # causal mean over ctx.past and hidden, padding masked
        delta = self.block(hidden, ctx) + self.from_summary(self.norm(so_far))
        return ModuleOutput(hidden=hidden + gate[..., None] * delta, score=gate)
