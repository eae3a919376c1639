"""Ablation: held-out perplexity with modules switched off, beside the full model's.

    rows = ablate(model, packed, batch_size=8, mode=Ablation.families)

Each row switches off one group of modules (:meth:`DharmaModel.switched_off`: they add
nothing to the hidden states; routing and scores are unchanged) and measures the
language-model loss on the same packed data. The first row is the full model, so each
row's ``change`` says how much perplexity rises (or falls) without that group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import DharmaError


class Ablation(StrEnum):
    """What to switch off, one group per row: each family, each module, or all modules at once."""

    families = "families"
    modules = "modules"
    all = "all"


@dataclass(frozen=True)
class AblationRow:
    """One measurement. ``off``: the family or module ref switched off, "all", or None for
    the full model; ``change``: perplexity relative to the full model's, minus 1."""

    off: str | None
    modules_off: int
    loss: float
    perplexity: float
    change: float


def family(ref: str) -> str:
    """The family of a module ref: ``"darshanas.vedanta"`` -> ``"darshanas"``."""
    return ref.partition(".")[0]


def groups(refs: Sequence[str], mode: Ablation | str) -> list[tuple[str, tuple[str, ...]]]:
    """``(name, refs switched off)`` per row after the full model's, in the model's module order;
    families and modules end with "all" too, when there is more than one group."""
    mode = Ablation(mode)
    every = [("all", tuple(refs))]
    if mode is Ablation.all:
        return every
    if mode is Ablation.modules:
        rows = [(ref, (ref,)) for ref in refs]
    else:
        by_family: dict[str, list[str]] = {}
        for ref in refs:
            by_family.setdefault(family(ref), []).append(ref)
        rows = [(name, tuple(members)) for name, members in by_family.items()]
    return rows + every if len(rows) > 1 else rows


def ablate(model: Any, packed: Any, batch_size: int, mode: Ablation | str) -> list[AblationRow]:
    """The full model's row, then one row per group of ``mode`` switched off, on ``packed`` data."""
    # evaluate imports torch; the CLI imports this module for its option's choices only.
    from .evaluate import lm_totals, perplexity

    refs = list(model.module_refs)
    if not refs:
        raise DharmaError("the model has no modules to switch off", hint="Leave out --ablate.")

    def measure(off: str | None, switched: Sequence[str]) -> tuple[str | None, int, float]:
        with model.switched_off(switched):
            loss_sum, count = lm_totals(model, packed, batch_size)
        return off, len(switched), loss_sum / max(count, 1.0)

    measured = [measure(None, ()), *(measure(name, members) for name, members in groups(refs, mode))]
    full = perplexity(measured[0][2])
    return [
        AblationRow(off, n, loss, perplexity(loss), perplexity(loss) / full - 1.0)
        for off, n, loss in measured
    ]
