"""The contract between the kernel and module or head plugins (MODULE_API 1).

A module reads the backbone's hidden states ``[B, T, H]`` between two
transformer blocks and returns new hidden states plus a per-token activation
score. The kernel applies it residually, supervises the score with concept
labels and checks the four promises (causal, stateless, fully trained,
cache-compatible) in :mod:`dharma_kernel.testing`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
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
    "RecordError",
    "ModuleContext",
    "ModuleOutput",
    "TokenOutput",
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
    rows: the active tokens as ascending indices into the flattened ``B * T`` tokens;
        derived from ``active`` when not given. ``None`` = all tokens.
    shared: one dict for all modules of a routed or parallel stack in one forward (they
        read the same input): blocks keep parameter-free results there, such as the
        running summary, so that they are computed once.
    """

    attention_mask: torch.Tensor | None = None
    past: torch.Tensor | None = None
    active: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rows is None and self.active is not None:
            self.rows = self.active.flatten().nonzero().squeeze(1)

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

    def pick(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, ...]`` at the active tokens: ``[N, ...]``, in ``rows`` order (all ``B * T`` if None)."""
        flat = x.flatten(0, 1)
        return flat if self.rows is None else flat.index_select(0, self.rows)

    def place(self, picked: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """The inverse of :meth:`pick`: ``[B, T, ...]``, ``picked`` at the active tokens, zeros elsewhere."""
        if self.rows is None:
            return picked.reshape(batch, length, *picked.shape[1:])
        out = picked.new_zeros(batch * length, *picked.shape[1:]).index_copy(0, self.rows, picked)
        return out.view(batch, length, *picked.shape[1:])


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


@dataclass
class TokenOutput:
    """A module's output at the tokens it was given (``ctx.rows``, all ``B * T`` when None), in that order.

    delta: ``[N, H]`` added to the hidden states there. score: ``[N]`` activation in [0, 1].
    losses, metrics: as in :class:`ModuleOutput`.
    """

    delta: torch.Tensor
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
    implement :meth:`forward`, or instead ``forward_tokens(x, hidden, ctx) -> TokenOutput``:
    the residual delta at the tokens ``x = ctx.pick(hidden)`` only (``hidden`` is there for
    blocks that read other positions). A module written token-wise gets ``forward`` from
    it, and under routed composition computes nothing at the tokens not routed to it.
    A family may also define ``grouped_tokens(members, x, where)``, its computation for several
    modules at once (see :mod:`dharma_kernel.grouped`), returning a :class:`TokenOutput` or, for
    a gated delta, ``grouped.gated(gate, delta)`` (a subclass that wraps its family's and changes
    the output takes ``grouped.applied(out)``, a TokenOutput, first); a subclass that overrides
    its family's computation without one runs alone.
    """

    family: ClassVar[str]
    concepts: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def ref(cls) -> str:
        return f"{cls.family}.{cls.name}"

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext) -> ModuleOutput:
        """``forward_tokens``' output placed at its tokens (a module that defines neither method errs)."""
        if not hasattr(self, "forward_tokens"):
            raise NotImplementedError(f"{type(self).__name__} defines neither forward nor forward_tokens")
        out = self.forward_tokens(ctx.pick(hidden), hidden, ctx)
        batch, length, _ = hidden.shape
        new_hidden = hidden + ctx.place(out.delta.to(hidden.dtype), batch, length)
        return ModuleOutput(new_hidden, ctx.place(out.score, batch, length), out.losses, out.metrics)


def computes_tokens(module: DharmaModule) -> bool:
    """Whether ``forward_tokens`` is the module's own computation.

    True when its class defines ``forward_tokens`` more recently than ``forward``: a
    plugin that overrides ``forward`` over a token-wise family keeps its override.
    """
    for cls in type(module).__mro__:
        if "forward_tokens" in vars(cls):
            return True
        if "forward" in vars(cls):
            return False
    return False


@dataclass
class HeadOutput:
    """logits: whatever the task predicts. losses: named losses when labels were given.

    The kernel adds each loss to the total as ``<head>/<name>`` (weight 1).
    """

    logits: torch.Tensor | dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class RecordError(ValueError):
    """A data record a head cannot use. Raise it from ``encode`` or ``fit_config`` with what is
    wrong with the record; the kernel turns it into a DharmaError naming the file and record number.
    """


class HeadModule(_Plugin):
    """Base class of task heads: reads the backbone's final hidden states ``[B, T, H]``.

    See docs/HEADS.md. The kernel reads records (JSONL objects; or :meth:`read`), checks
    that each has the ``inputs`` and ``targets`` fields, lets :meth:`fit_config` learn from
    the training records (a label list), turns each record into features with
    :meth:`encode`, pads and batches them, trains with the model's total loss, and calls
    :meth:`predict` and :meth:`metrics` to evaluate and to answer ``dharma predict``.
    """

    inputs: ClassVar[tuple[str, ...]] = ("text",)  # record fields a prediction needs
    targets: ClassVar[tuple[str, ...]] = ()  # record fields training and evaluation also need
    # True: the head trains the language model itself (its features carry ``labels``, LM
    # targets with -100 where no loss is wanted) and predicts by generating.
    uses_lm_loss: ClassVar[bool] = False
    # Padding of per-token features other than input_ids (pad id) and labels (-100); default 0.
    pad_values: ClassVar[dict[str, int | float]] = {}
    # Other names a record may give an inputs or targets field under (qa: "answers" for "answer").
    field_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    # The metric fine-tuning ranks checkpoints by (``select = "metric"``); None: the first one
    # :meth:`metrics` returns.
    metric: ClassVar[str | None] = None

    @classmethod
    def read(cls, path: Path) -> list[dict[str, Any]] | None:
        """Records of a file in a format of the head's own; None: the kernel reads it as JSONL."""
        return None

    @classmethod
    def fit_config(cls, config: ModuleConfig, records: list[dict[str, Any]]) -> ModuleConfig:
        """The config with what is learned from the training records (e.g. the label list).

        It is saved with the model, so the head is rebuilt the same way when loaded.
        """
        return config

    def encode(self, record: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
        """One record as features: ``input_ids`` (list of ints, at most ``max_length``) and
        the head's own fields: an int or float per record, or a list per token.

        ``labels`` (a per-token list) is the LM target; every other field reaches
        :meth:`forward` as a keyword. Target fields are encoded only when the record has
        them (``dharma predict`` gives records without). Raise :class:`RecordError`.
        """
        raise NotImplementedError

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, **labels: torch.Tensor
    ) -> HeadOutput:  # pragma: no cover
        raise NotImplementedError

    def predict(
        self, model: nn.Module, tokenizer: Any, records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """One JSON-able prediction per record (a batch); ``model`` is in eval mode, no grad."""
        raise NotImplementedError

    def metrics(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, float]:
        """Named scores of ``predictions`` against the records' targets (higher is better)."""
        return {}

    def format_prediction(self, prediction: dict[str, Any]) -> str:
        """What ``dharma predict`` prints for one prediction (``--json`` prints it as JSON)."""
        return json.dumps(prediction, ensure_ascii=False)
