"""Groups computed from each module's rows: a parallel stack's grouped path (every module at
every token), and any caller that has each module's tokens (the tests of each family's grouped
form). A routed stack lays out its own slots (``ModuleStack._run_modules``)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from . import grouped
from .attention_pool import attend_together
from .grouped import GroupInput, Groups
from .protocol import DharmaModule, ModuleContext, TokenOutput


def _group_input(
    members: Sequence[DharmaModule],
    hidden: torch.Tensor,
    ctx: ModuleContext,
    rows: torch.Tensor,
    counts: Sequence[int],
) -> tuple[Groups, torch.Tensor, GroupInput]:
    """A group's padded layout of its tokens ``hidden.flatten(0, 1)[rows]``, module after module
    (``counts`` each), its inputs there ``[M, most, H]`` and their :class:`GroupInput`. ``ctx``: the
    stack's context (mask, past, shared), without rows."""
    groups = Groups(counts, hidden.device)
    slot_rows = groups.pad(rows[:, None]).flatten()  # an empty slot's: row 0
    real = (
        None if len(set(counts)) == 1 else groups.pad(rows.new_ones(len(rows), 1, dtype=torch.bool)).flatten()
    )
    x = groups.pad(grouped.flattened(hidden).index_select(0, rows))
    return groups, x, GroupInput(hidden, ctx, slot_rows, groups.most, real)


def run_groups(
    members: Sequence[DharmaModule],
    hidden: torch.Tensor,
    ctx: ModuleContext,
    rows: Sequence[torch.Tensor],
    order: Sequence[Sequence[int]] | None = None,
    alone: Collection[int] = (),
) -> dict[int, TokenOutput]:
    """The output of each groupable module (by index) at its tokens ``hidden.flatten(0, 1)[rows[i]]``
    (each ascending), computed group by group.

    Modules without tokens, and groups of one, are left out: they run alone (the reference path).
    ``order``: ``plan_runs(members)``, if the caller has it already. ``alone``: the runs (by first
    member) that compute here even with one module, as a group of one (groupable ones only), its
    losses and metrics kept as they are when it runs alone.
    """
    outputs: dict[int, TokenOutput] = {}
    prepared = []  # per group: its members (by index), tokens each, layout and inputs
    for indices in grouped.plan_runs(members) if order is None else order:
        running = [i for i in indices if len(rows[i])]
        if not running or (len(running) == 1 and indices[0] not in alone):
            continue
        counts = [len(rows[i]) for i in running]
        at = torch.cat([rows[i] for i in running])
        prepared.append(
            (running, counts, *_group_input([members[i] for i in running], hidden, ctx, at, counts))
        )
    attend_together([([members[i] for i in running], x, where) for running, _, _, x, where in prepared])
    for running, counts, groups, x, where in prepared:
        out = grouped.applied(grouped.grouped_forward([members[i] for i in running], x, where))
        delta, score = groups.unpad(out.delta), groups.unpad(out.score)
        parts = zip(delta.split(counts), score.split(counts), strict=True)
        for index, (d, s) in zip(running, parts, strict=True):
            outputs[index] = TokenOutput(d, s)
        if len(running) == 1:
            outputs[running[0]] = TokenOutput(delta, score, out.losses, out.metrics)
    ctx.shared.pop(grouped.POOL, None)  # it refers back to ctx: freed with it, not by the cycle collector
    return outputs
