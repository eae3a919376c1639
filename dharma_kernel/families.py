"""The six families' architectures, built from kernel blocks. A plugin subclasses one.

A module plugin then declares only what is its own: name, concept lexicon, and
any preset that differs from its family's. The families are written token-wise
(``forward_tokens``): under routed composition they compute only at the tokens
routed to them, ``x``, reading the whole sequence ``hidden`` only to attend.

Sizes: ``lite`` is the ``Config`` default (all 37 at two layers add under 5% to
DistilGPT2); ``seed`` is the original system's scale at hidden size 768 (all 37 at
one layer: about 174M parameters).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from . import grouped
from .blocks import (
    BottleneckAdapter,
    CausalAttention,
    ConceptDetector,
    GatedResidual,
    MemoryAttention,
    MultiViewAttention,
    RunningSummary,
)
from .protocol import DharmaModule, ModuleConfig, ModuleContext, TokenOutput


def _gated(gate: torch.Tensor, delta: torch.Tensor) -> TokenOutput:
    """The family modules' shared output: the delta applied as strongly as the concept is detected."""
    return TokenOutput(delta=gate[..., None] * delta, score=gate)


class PathModule(DharmaModule):
    """paths: a residual concept block: detectors gate a bottleneck adapter plus a concept direction."""

    family: ClassVar[str] = "paths"

    class Config(ModuleConfig):
        bottleneck: int = Field(24, ge=1)
        detectors: int = Field(2, ge=1)

    presets: ClassVar[dict] = {"tiny": {"bottleneck": 8}, "seed": {"bottleneck": 3450, "detectors": 4}}

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        self.detector = ConceptDetector(hidden_size, self.config.detectors)
        self.adapter = BottleneckAdapter(hidden_size, self.config.bottleneck)
        self.direction = nn.Parameter(torch.zeros(hidden_size))

    def delta(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> torch.Tensor:
        """The delta ``[N, H]`` at the module's tokens ``x``."""
        return self.adapter(x) + self.direction

    def forward_tokens(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> TokenOutput:
        gate, _ = self.detector(x)
        return _gated(gate, self.delta(x, hidden, ctx))

    @classmethod
    def grouped_delta(cls, members: list, x: torch.Tensor, where: grouped.GroupInput) -> torch.Tensor:
        """:meth:`delta` of each token's module (see :mod:`.grouped`)."""
        return grouped.adapter([m.adapter for m in members], x) + grouped.along_tokens(members, "direction")

    @classmethod
    def grouped_tokens(cls, members: list, x: torch.Tensor, where: grouped.GroupInput) -> TokenOutput:
        gate, _ = grouped.detector([m.detector for m in members], x)
        return grouped.gated(gate, cls.grouped_delta(members, x, where))


class MemoryPathModule(PathModule):
    """A path that also reads a learned memory of patterns (karma: patterns of action)."""

    class Config(PathModule.Config):
        slots: int = Field(16, ge=1)
        key_dim: int = Field(16, ge=1)

    presets: ClassVar[dict] = {
        "tiny": {"bottleneck": 8, "slots": 4, "key_dim": 4},
        "lite": {"bottleneck": 16},
        "seed": {"bottleneck": 2800, "detectors": 4, "slots": 512, "key_dim": 256},
    }

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        self.memory = MemoryAttention(hidden_size, self.config.slots, self.config.key_dim)

    def delta(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> torch.Tensor:
        return super().delta(x, hidden, ctx) + self.memory(x)

    @classmethod
    def grouped_delta(cls, members: list, x: torch.Tensor, where: grouped.GroupInput) -> torch.Tensor:
        path = super().grouped_delta(members, x, where)
        return path + grouped.memory([m.memory for m in members], x)

    grouped_tokens = PathModule.__dict__["grouped_tokens"]  # its own: a memory path groups apart


class MultiViewPathModule(PathModule):
    """A large path that reads the text so far through several causal attention views (jnana, yoga)."""

    class Config(PathModule.Config):
        views: int = Field(2, ge=1)
        heads: int = Field(2, ge=1)
        head_dim: int = Field(8, ge=1)
        kv_heads: int = Field(1, ge=1)

    presets: ClassVar[dict] = {
        "tiny": {"bottleneck": 8, "views": 2, "heads": 2, "head_dim": 4, "kv_heads": 1},
        "lite": {"bottleneck": 16},
        "seed": {"bottleneck": 5100, "detectors": 4, "views": 3, "heads": 12, "head_dim": 64, "kv_heads": 2},
    }

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        c = self.config
        self.attention = MultiViewAttention(hidden_size, c.views, c.heads, c.head_dim, c.kv_heads)

    def delta(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> torch.Tensor:
        return super().delta(x, hidden, ctx) + self.attention.at_tokens(x, hidden, ctx)

    @classmethod
    def grouped_delta(cls, members: list, x: torch.Tensor, where: grouped.GroupInput) -> torch.Tensor:
        path = super().grouped_delta(members, x, where)
        return path + grouped.multi_view([m.attention for m in members], x, where)

    grouped_tokens = PathModule.__dict__["grouped_tokens"]  # its own: a multi-view path groups apart

    @classmethod
    def grouped_attention(cls, members: list) -> tuple[list, int]:
        """The attention its grouped code computes at its slots (see :mod:`.attention_pool`)."""
        return grouped.views_in_order([m.attention for m in members]), len(members[0].attention.views)


class ConsciousnessModule(DharmaModule):
    """consciousness: a small gated residual block (channel-wise GLU), applied as strongly as detected."""

    family: ClassVar[str] = "consciousness"

    class Config(ModuleConfig):
        inner: int = Field(16, ge=1)

    presets: ClassVar[dict] = {"tiny": {"inner": 8}, "seed": {"inner": 1300}}

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        self.detector = ConceptDetector(hidden_size)
        self.block = GatedResidual(hidden_size, self.config.inner)

    def forward_tokens(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> TokenOutput:
        gate, _ = self.detector(x)
        return _gated(gate, self.block(x))

    @classmethod
    def grouped_tokens(cls, members: list, x: torch.Tensor, where: grouped.GroupInput) -> TokenOutput:
        gate, _ = grouped.detector([m.detector for m in members], x)
        return grouped.gated(gate, grouped.gated_residual([m.block for m in members], x))


class DetectorModule(DharmaModule):
    """life and energy: several concept detectors; their per-token intensity gates a residual MLP that
    also sees which detectors fired."""

    family: ClassVar[str]

    class Config(ModuleConfig):
        detectors: int = Field(3, ge=1)
        inner: int = Field(24, ge=1)

    presets: ClassVar[dict] = {"tiny": {"detectors": 2, "inner": 8}, "seed": {"detectors": 6, "inner": 2600}}

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        self.detector = ConceptDetector(hidden_size, self.config.detectors)
        self.mlp = BottleneckAdapter(hidden_size, self.config.inner, extra_inputs=self.config.detectors)

    def forward_tokens(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> TokenOutput:
        gate, intensity = self.detector(x)
        return _gated(gate, self.mlp(x, extra=intensity))

    @classmethod
    def grouped_tokens(cls, members: list, x: torch.Tensor, where: grouped.GroupInput) -> TokenOutput:
        gate, intensity = grouped.detector([m.detector for m in members], x)
        return grouped.gated(gate, grouped.adapter([m.mlp for m in members], x, extra=intensity))


class LifeModule(DetectorModule):
    family: ClassVar[str] = "life"


class EnergyModule(DetectorModule):
    family: ClassVar[str] = "energy"


class CrisisModule(DharmaModule):
    """crisis: detectors of distress cues; where they fire, a guidance transform is blended in.

    The guidance is an MLP of the text plus a learned direction per cue, weighted by how
    strongly each cue was detected.
    """

    family: ClassVar[str] = "crisis"

    class Config(ModuleConfig):
        cues: int = Field(3, ge=1)
        inner: int = Field(24, ge=1)

    presets: ClassVar[dict] = {"tiny": {"cues": 2, "inner": 8}, "seed": {"cues": 8, "inner": 1900}}

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        self.detector = ConceptDetector(hidden_size, self.config.cues)
        self.guidance = BottleneckAdapter(hidden_size, self.config.inner)
        self.cue_directions = nn.Parameter(torch.zeros(self.config.cues, hidden_size))

    def forward_tokens(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> TokenOutput:
        gate, distress = self.detector(x)
        return _gated(gate, self.guidance(x) + distress.to(x.dtype) @ self.cue_directions)

    @classmethod
    def grouped_tokens(cls, members: list, x: torch.Tensor, where: grouped.GroupInput) -> TokenOutput:
        gate, distress = grouped.detector([m.detector for m in members], x)
        guidance = grouped.adapter([m.guidance for m in members], x)
        cues = torch.bmm(distress.to(x.dtype), grouped.stacked(members, "cue_directions", x.dtype))
        return grouped.gated(gate, guidance + cues)


class DarshanaModule(DharmaModule):
    """darshanas: causal self-attention, a causal running summary of the text so far, and a feed-forward."""

    family: ClassVar[str] = "darshanas"

    class Config(ModuleConfig):
        heads: int = Field(2, ge=1)
        head_dim: int = Field(8, ge=1)
        kv_heads: int = Field(1, ge=1)
        feed_forward: int = Field(8, ge=1)
        summary: int = Field(4, ge=1)

    presets: ClassVar[dict] = {
        "tiny": {"heads": 2, "head_dim": 4, "kv_heads": 1, "feed_forward": 8, "summary": 4},
        "seed": {"heads": 12, "head_dim": 64, "kv_heads": 2, "feed_forward": 3100, "summary": 640},
    }

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        c = self.config
        self.detector = ConceptDetector(hidden_size)
        self.attention = CausalAttention(hidden_size, c.heads, c.head_dim, c.kv_heads)
        self.summary = RunningSummary()
        self.summary_proj = BottleneckAdapter(hidden_size, c.summary)
        self.feed_forward = BottleneckAdapter(hidden_size, c.feed_forward)

    def forward_tokens(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> TokenOutput:
        gate, _ = self.detector(x)
        summary = ctx.pick(self.summary(hidden, ctx))  # one for all darshanas of a routed/parallel stack
        mixed = self.attention.at_tokens(x, hidden, ctx) + self.summary_proj(summary)
        return _gated(gate, mixed + self.feed_forward(x + mixed))

    @classmethod
    def grouped_tokens(cls, members: list, x: torch.Tensor, where: grouped.GroupInput) -> TokenOutput:
        gate, _ = grouped.detector([m.detector for m in members], x)
        summary = where.pick(members[0].summary(where.hidden, where.ctx))  # parameter-free, shared
        attended = grouped.attention([m.attention for m in members], x, where)
        mixed = attended + grouped.adapter([m.summary_proj for m in members], summary)
        return grouped.gated(gate, mixed + grouped.adapter([m.feed_forward for m in members], x + mixed))

    @classmethod
    def grouped_attention(cls, members: list) -> tuple[list, int]:
        """The attention its grouped code computes at its slots (see :mod:`.attention_pool`)."""
        return [m.attention for m in members], 1
