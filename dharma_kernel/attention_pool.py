"""One attention call for a stack's attention groups (:func:`attend_together`).

Families whose grouped code attends (darshanas, the multi-view paths) declare the
:class:`~dharma_kernel.blocks.CausalAttention` blocks it attends with (``grouped_attention``).
Where two or more of a stack's groups attend with blocks of one shape, the first that calls
:func:`~dharma_kernel.grouped.attention` computes all of them in one call: one key/value
product, one query and one output product and one attention call for the stack, where each
group made its own. Each group gets its part; the result equals each group attending alone.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import grouped
from .blocks import CausalAttention
from .grouped import GroupInput, group_key
from .protocol import DharmaModule


@dataclass
class Attending:
    """A group's request to attend: its blocks (``times`` copies' worth) at its slots ``x [M, C, H]``,
    the stack's slots from ``start`` on (see :func:`attend_together`)."""

    blocks: list[nn.Module]
    x: torch.Tensor
    where: GroupInput
    times: int
    start: int


@dataclass
class Slots:
    """A routed stack's slots (a group's ``[Mg, C]`` of them row after row, a module alone's its
    tokens): their inputs ``x [S, H]``, rows of ``hidden.flatten(0, 1)`` ``[S]``, and which hold a
    token ``[S]`` (None: all do)."""

    x: torch.Tensor
    rows: torch.Tensor
    real: torch.Tensor | None


class AttentionPool:
    """The attention of several groups of one stack forward as one call (:func:`attend_together`):
    their slots gathered from the stack's ``slots``, each group's padded to the most any has (or,
    without ``slots``, the groups' own inputs joined: as many slots each), their blocks one after
    another; computed when the first group asks, each group's part handed to it."""

    def __init__(self, requests: list[Attending], slots: Slots | None) -> None:
        self.requests, self.slots = requests, slots
        self.outputs: list[torch.Tensor] | None = None

    def output(self, blocks: Sequence[nn.Module], x: torch.Tensor, where: GroupInput, times: int):
        """The attention of ``blocks`` at ``x`` if it is one of the requests (the same blocks at the
        same slots), else None."""
        for index, request in enumerate(self.requests):
            if request.x is x and request.where is where and request.times == times:
                if len(request.blocks) != len(blocks) or not all(map(operator.is_, request.blocks, blocks)):
                    return None
                if self.outputs is None:
                    self.outputs = self._computed()
                return self.outputs[index]
        return None

    def _computed(self) -> list[torch.Tensor]:
        requests = self.requests
        x, where = self._gathered() if self.slots is not None else self._joined()
        y = grouped._attention([b for r in requests for b in r.blocks], x, where)
        parts = y.split([len(r.blocks) for r in requests])
        return [
            part if r.where.slots == where.slots else part[:, : r.where.slots]  # cut back to its slots
            for part, r in zip(parts, requests, strict=True)
        ]

    def _gathered(self) -> tuple[torch.Tensor, GroupInput]:
        """The requests' slots gathered from the stack's, each padded to the most any has."""
        requests, slots = self.requests, self.slots
        most = max(r.where.slots for r in requests)
        # each pooled slot's place among the stack's: a request's rows, copy after copy, each padded
        # (-1: read the stack's first slot, finite: a token's input or an empty slot's zeros); on
        # the host (no aten op, no device wait), one copy to the device
        columns, tables = np.arange(most), []
        for r in requests:
            count, size = len(r.blocks) // r.times, r.where.slots
            table = np.where(columns < size, r.start + size * np.arange(count)[:, None] + columns, -1)
            tables += [table] * r.times
        places = np.concatenate(tables).ravel()
        at = grouped.on_device(places.tolist(), slots.x.device)
        real = at >= 0 if len(places) > sum(len(r.blocks) * r.where.slots for r in requests) else None
        if real is not None:
            at = at.clamp(min=0)
        if slots.real is not None:
            picked = slots.real.index_select(0, at)
            real = picked if real is None else picked & real
        first = requests[0].where
        where = GroupInput(first.hidden, first.ctx, slots.rows.index_select(0, at), most, real, first.fixed)
        return slots.x.index_select(0, at).view(len(places) // most, most, -1), where

    def _joined(self) -> tuple[torch.Tensor, GroupInput]:
        """The requests' slots one after another (as many each: see :func:`attend_together`)."""
        requests, first = self.requests, self.requests[0].where
        xs, rows, reals = [], [], []
        for r in requests:
            xs += [r.x] * r.times
            rows += [r.where.rows] * r.times
            reals += [r.where.real] * r.times
        real = None
        if any(t is not None for t in reals):
            real = torch.cat(
                [
                    at.new_ones(len(at), dtype=torch.bool) if t is None else t
                    for t, at in zip(reals, rows, strict=True)
                ]
            )
        where = GroupInput(first.hidden, first.ctx, torch.cat(rows), first.slots, real, first.fixed)
        return torch.cat(xs), where


def attend_together(
    groups: Sequence[tuple[Sequence[DharmaModule], torch.Tensor, GroupInput]],
    slots: Slots | None = None,
    starts: Sequence[int] = (),
) -> None:
    """Before a stack's groups ``(members, x, where)`` compute (one stack forward, one ``where.ctx``):
    where two or more of them attend with blocks of one shape, their attention is computed as one
    call (:class:`AttentionPool`, in ``ctx.shared``), where each group's is one call, its keys and
    values a product, its queries and output a product each: about 200 ops a group (a training
    step on the CPU, forward and backward). A group attends as its family declares
    (``grouped_attention``, see :func:`attention_blocks`). ``slots``: the stack's, each group's
    from its ``starts`` on (its queries are gathered from them, padded to the most any group
    has); without, the groups' own ``x``, joined only if they have as many slots each. Groups
    whose weights are held stacked attend together only with groups held alike (one read of
    their stacked tensors; see :func:`_holding`). Not while compiling."""
    if torch.compiler.is_compiling() or not groups:
        return
    if slots is not None and len(starts) != len(groups):
        raise ValueError(f"attend_together: {len(groups)} groups but {len(starts)} starts in the slots")
    requests = []
    for (members, x, where), start in zip(groups, starts or [0] * len(groups), strict=True):
        declared = attention_blocks(members)
        if declared is not None:
            requests.append(Attending(declared[0], x, where, declared[1], start))
    kinds = {attention_kind(r.blocks) for r in requests}
    ctx = groups[0][2].ctx
    if (
        len(requests) > 1
        and len(kinds) == 1
        and None not in kinds
        and len({r.where.fixed for r in requests}) == 1
        and (slots is not None or len({r.where.slots for r in requests}) == 1)
        and (not grouped.HELD or len({_holding(r.blocks) for r in requests}) == 1)
    ):
        ctx.shared[grouped.POOL] = AttentionPool(requests, slots)
    else:
        ctx.shared.pop(grouped.POOL, None)


def _holding(blocks: Sequence[nn.Module]) -> tuple[bool, ...]:
    """Per parameter of the blocks (their first's, in order), whether training holds it stacked
    for exactly these blocks. Pooled with blocks held otherwise (a group partly frozen, so not
    held), the call would read every parameter stacked afresh and no held tensor, whose rows
    then take their gradients through the members' hooks: each member's row would step, idle
    members' too."""
    return tuple(
        owners is not None and grouped._held(owners, name, read=False) is not None
        for name, owners in parameter_owners(blocks)
    )


def parameter_owners(blocks: Sequence[nn.Module]) -> list[tuple[str, list[nn.Module] | None]]:
    """Each parameter of the first of ``blocks`` (by name, in order) with the submodule that owns it
    in every block (None if a block lacks that submodule)."""
    found, subs = [], [dict(b.named_modules()) for b in blocks]
    for path, block in blocks[0].named_modules():
        owners = [sub.get(path) for sub in subs]
        complete = None if any(owner is None for owner in owners) else owners
        found += [(name, complete) for name, _ in block.named_parameters(recurse=False)]
    return found


def attention_blocks(members: Sequence[DharmaModule]) -> tuple[list[nn.Module], int] | None:
    """The attention blocks a group's grouped code passes to :func:`~dharma_kernel.grouped.attention`
    at its slots, in that order, and how many copies' worth they are (``times``), as its family
    declares them (``grouped_attention(members)``, defined in the class that defines its
    ``grouped_tokens``: a plugin with its own grouped code declares its own); None if it declares
    none."""
    key = group_key(members[0])
    declared = None if key is None else vars(key[0]).get("grouped_attention")
    return None if declared is None else declared.__get__(None, key[0])(list(members))


def attention_kind(blocks: Sequence[nn.Module]) -> tuple | None:
    """What attention blocks must share to attend in one call (None: blocks that cannot)."""
    kinds = set()
    for b in blocks:
        if not isinstance(b, CausalAttention):
            return None
        parameters = (b.norm.weight, b.query.weight, b.key_value.weight, b.out.weight)
        kinds.add(
            (
                b.heads,
                b.kv_heads,
                b.head_dim,
                tuple(b.norm.normalized_shape),
                b.norm.eps,
                b.norm.weight is None,
                tuple(layer.bias is None for layer in (b.norm, b.query, b.key_value, b.out)),
                tuple((p.shape, p.dtype, p.device) for p in parameters if p is not None),
            )
        )
    return kinds.pop() if len(kinds) == 1 else None
