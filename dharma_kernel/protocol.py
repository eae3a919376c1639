"""The contract between the kernel and module or head plugins (MODULE_API 1).

A module reads the backbone's hidden states ``[B, T, H]`` between two
transformer blocks and returns new hidden states plus a per-token activation
score. The kernel applies it residually, supervises the score with concept
labels and checks the four promises (causal, stateless, fully trained,
cache-compatible) in :mod:`dharma_kernel.testing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .version import MODULE_API

__all__ = [
    "MODULE_API",
    "DharmaModule",
    "HeadModule",
    "HeadOutput",
    "ModuleConfig",
    "ModuleContext",
    "ModuleOutput",
]


class ModuleConfig(BaseModel):
    """Base of every plugin's ``Config``: unknown keys are an error, values are frozen."""

    # strict like the manifest: "4" or 4.0 for an integer size is a mistake, not a conversion
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass
class ModuleContext:
    """What a module may look at besides its input hidden states.

    attention_mask: ``[B, P + T]`` with 1 for real tokens and 0 for padding, covering
        the ``P`` cached positions and the ``T`` current ones; ``None`` means no padding.
    past: ``[B, P, H]``, this module's own inputs at the earlier positions during
        cached generation, else ``None``. Sequence-mixing blocks attend over
        ``cat(past, hidden)`` so cached and uncached runs agree.
    active: ``[B, T]`` bool, the tokens the router sent to this module under
        ``routed`` composition (outputs elsewhere are discarded); ``None`` = all.
    """

    attention_mask: torch.Tensor | None = None
    past: torch.Tensor | None = None
    active: torch.Tensor | None = None

    @property
    def past_length(self) -> int:
        return 0 if self.past is None else self.past.shape[1]

    def token_mask(self, length: int) -> torch.Tensor | None:
        """``[B, T]`` bool mask of real tokens among the current ``length`` positions."""
        if self.attention_mask is None:
            return None
        return self.attention_mask[:, -length:].bool()

    def key_mask(self, length: int) -> torch.Tensor | None:
        """``[B, P + T]`` bool mask of real tokens among cached and current positions."""
        if self.attention_mask is None:
            return None
        return self.attention_mask[:, -(self.past_length + length) :].bool()


@dataclass
class ModuleOutput:
    """hidden: ``[B, T, H]`` new hidden states. score: ``[B, T]`` activation in [0, 1].

    losses: extra named losses (added to the total as they are).
    metrics: named scalars for logging; never part of the loss.
    """

    hidden: torch.Tensor
    score: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class _Plugin(nn.Module):
    """What modules and heads share: a pydantic Config, presets and an API version."""

    name: ClassVar[str]
    module_api: ClassVar[str]  # the MODULE_API the plugin was written for; declared by each plugin
    Config: ClassVar[type[ModuleConfig]] = ModuleConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.config = config if config is not None else self.Config()

    @classmethod
    def make_config(cls, preset: str | None = None, overrides: dict[str, Any] | None = None) -> ModuleConfig:
        """The config for a preset (unknown presets fall back to the Config defaults) plus overrides."""
        values = {**cls.presets.get(preset or "", {}), **(overrides or {})}
        return cls.Config(**values)


class DharmaModule(_Plugin):
    """Base class of module plugins.

    Subclasses set ``family``, ``name``, ``module_api``, ``concepts`` (lexicon terms in
    Devanagari, IAST and English), a ``Config`` and optionally ``presets``, and
    implement :meth:`forward`.
    """

    family: ClassVar[str]
    concepts: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def ref(cls) -> str:
        return f"{cls.family}.{cls.name}"

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext) -> ModuleOutput:  # pragma: no cover
        raise NotImplementedError


@dataclass
class HeadOutput:
    """logits: whatever the task predicts. losses: named losses when labels were given."""

    logits: torch.Tensor | dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class HeadModule(_Plugin):
    """Base class of task heads: reads the backbone's final hidden states ``[B, T, H]``."""

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, **labels: torch.Tensor
    ) -> HeadOutput:  # pragma: no cover
        raise NotImplementedError
