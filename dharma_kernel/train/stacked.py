"""Grouped modules' parameters held stacked, for eager training on the grouped path.

A group of modules (:mod:`dharma_kernel.grouped`) computes each block with one batched
product over its members' weights stacked ``[M, ...]``. Stacked afresh in every forward, that
costs a copy forward, a split backward and a gradient per member; and AdamW then steps over
a thousand small tensors one by one. Here each of a group's parameters is held as one stacked
tensor that the grouped path reads as it is (:data:`~dharma_kernel.grouped.HELD`); each
member's own parameter is a row of it (its storage a view), so the model that is evaluated,
saved and exported is the one being trained, under its own names. The stacked tensors of
one device and dtype are views of one flat tensor, their gradients of one flat gradient,
and AdamW steps each flat tensor at once (weight decay per row).

Exact: AdamW is per parameter, so a member that did not compute (under exact routing, one no
token chose) must be left as it is, moments and step count too, as torch's AdamW leaves a
parameter without a gradient. The update is masked per member parameter (a row): each row
has its own step count, and a row moves only if its module computed since the last step (the
stack says which, :attr:`~dharma_kernel.stack.ModuleStack.on_ran`) and the grouped path read
its stacked tensor. A member parameter read outside its group (a module run alone) gets its
gradient as any parameter does; a hook moves it into its row and marks the row.

A group is held whole or not at all: a parameter trainable in some of its members and frozen
in others (one module's ref frozen) leaves the group as it was, stacked in every forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attention_pool import attention_blocks, attention_kind, parameter_owners
from ..grouped import HELD, SPANS, Held, as_member, group_key, held_shape, held_transposed
from .flat import aligned_starts
from .optim import decay_split

# AdamW steps a flat tensor this many elements at a time (whole rows): its temporaries, a few
# per element and each element's row index, stay bounded (under about 400 MB in float32) however
# many parameters are held.
CHUNK = 1 << 24


@dataclass
class Stacked:
    """One parameter of a group's members held stacked: ``leaf [M, ...]`` (laid out by
    ``held_shape``; what the grouped path reads and autograd accumulates into), the member
    parameters (row views of it), the blocks that own them, the members (modules) they belong
    to, and the parameter name."""

    leaf: nn.Parameter
    params: list[nn.Parameter]
    owners: list[nn.Module]
    modules: list[nn.Module]
    name: str
    start: int  # first element in its bucket's flat tensor
    rows: list[int]  # each member parameter's row (its step count) in the bucket
    transposed: bool  # rows hold the member parameters transposed (held_shape)

    def member(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Member parameter ``i``'s part of a flat tensor of its bucket (the parameters, their
        gradient or a moment), in the parameter's shape: a view."""
        shape = self.params[i].shape
        n = shape.numel()
        row = flat[self.start + i * n : self.start + (i + 1) * n]
        return as_member(row.view(held_shape(shape, self.transposed)), shape, self.transposed)


@dataclass
class Chunk:
    """A run of whole rows of a flat tensor: its elements, and its rows as (row, length) segments
    in element order (the gaps between stacked tensors are the bucket's last row, never stepped)."""

    span: slice
    rows: torch.Tensor
    lengths: torch.Tensor


@dataclass
class Bucket:
    """The stacked tensors of one (device, dtype): ``holder`` wraps the flat tensor (its ``grad``:
    the flat gradient), so clipping sees one tensor; ``steps``: AdamW's step count per row, one
    more for the gaps; ``decays``: whether each row has weight decay (None: none has)."""

    holder: nn.Parameter
    stacked: list[Stacked] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    steps: torch.Tensor | None = None
    decays: torch.Tensor | None = None
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None


def _group_parameters(members: list[nn.Module]) -> list[tuple] | None:
    """Each trainable parameter of a group's members as (owning blocks, name, parameters, copies:
    1, or the blocks of a module list merged, see :func:`_lists_merged`); None if
    the group cannot be held: a parameter trainable in some members and frozen in others, or of
    other shapes, dtypes or devices. Parameters frozen in every member are left out."""
    subs = [dict(m.named_modules()) for m in members]
    out = []
    for path, first in subs[0].items():
        owners = [s.get(path) for s in subs]
        if any(o is None for o in owners):
            return None
        for name, _ in first.named_parameters(recurse=False):
            params = [getattr(o, name, None) for o in owners]
            if not all(isinstance(p, nn.Parameter) for p in params):
                return None
            trainable = {p.requires_grad for p in params}
            if trainable == {False}:
                continue
            if len(trainable) > 1 or len({(tuple(p.shape), p.dtype, p.device) for p in params}) > 1:
                return None
            out.append((path, owners, name, params))
    return _lists_merged(out, subs[0])


def _lists_merged(entries: list, blocks: dict[str, nn.Module]) -> list:
    """``entries`` (path, owners, name, parameters) with those of the blocks of a module list that
    its owner reads together (named in its ``read_together``; paths ``a.views.0.b``,
    ``a.views.1.b``, ...; same name and shape) merged into one, index after index, as grouped
    code reads them (:func:`~dharma_kernel.grouped.multi_view`): one tensor, not a cat of one per
    index. Other lists stay apart: grouped code may read their blocks one index at a time, and a
    merged tensor would then not be found. The list is the one of a path's last index (a list
    inside a listed block's own list, or a ParameterList, stays one tensor per index: safe, not
    merged). ``blocks``: the first member's, by path. Each entry as (owners, name, parameters,
    indices merged)."""
    lists: dict[tuple, list] = {}
    for path, owners, name, params in entries:
        parts = path.split(".")
        at = max((i for i, part in enumerate(parts) if part.isdigit()), default=0)
        owner = blocks.get(".".join(parts[: at - 1])) if at else None  # the list's module ("": the member)
        together = at > 0 and parts[at - 1] in getattr(owner, "read_together", ())
        within = (".".join(parts[:at]), ".".join(parts[at + 1 :])) if together else (path,)
        lists.setdefault((*within, name, tuple(params[0].shape)), []).append((owners, params))
    out = []
    for key, same in lists.items():
        owners = [o for owners, _ in same for o in owners]
        out.append((owners, key[-2], [p for _, params in same for p in params], len(same)))
    return out


def _spanned(groups: list[list[nn.Module]], entries: list) -> list[list]:
    """A stack's held ``entries`` (owners, name, parameters, modules) as units to lay out: one
    entry each, but where two or more of the stack's ``groups`` (held, in run order) attend in
    one call (:func:`~dharma_kernel.attention_pool.attend_together`), each parameter of their attention
    blocks one unit of every group's entry, in that order: laid out one after another, one
    tensor spans them (:data:`~dharma_kernel.grouped.SPANS`), which the call reads whole where
    a concatenation would cost an op forward and a chain backward."""
    requests = [blocks for blocks, _ in filter(None, map(attention_blocks, groups))]
    if len(requests) < 2 or attention_kind([b for blocks in requests for b in blocks]) is None:
        return [[entry] for entry in entries]
    by_owners = {(tuple(map(id, entry[0])), entry[1]): entry for entry in entries}
    spans = []
    every = [parameter_owners(blocks) for blocks in requests]  # per request, in one order of names
    for index, (name, _) in enumerate(every[0]):
        owned = [owners[index][1] for owners in every]
        if any(owners is None for owners in owned):
            continue
        unit = [by_owners.get((tuple(map(id, owners)), name)) for owners in owned]
        if all(entry is not None for entry in unit):
            kinds = {(entry[2][0].device, entry[2][0].dtype, entry[2][0].shape) for entry in unit}
            if len(kinds) == 1:  # one bucket, one row layout
                spans.append(unit)
    spanned = {id(entry) for unit in spans for entry in unit}
    return [[entry] for entry in entries if id(entry) not in spanned] + spans


class StackedParameters:
    """The grouped members' trainable parameters held stacked (see the module docstring)."""

    def __init__(self, stacks: list[nn.Module], decayed: set[int]) -> None:
        if any(stack.on_ran is not None for stack in stacks):
            raise ValueError("these stacks' parameters are held stacked already: release() that first")
        self.stacks = stacks
        self.buckets: list[Bucket] = []
        self.held: set[int] = set()  # ids of the member parameters held
        self._hooks: list = []
        self._keys: list[tuple[int, str]] = []
        self._spans: list[tuple[int, ...]] = []
        self._repointed: list[nn.Parameter] = []  # member parameters whose storage is a stacked tensor's
        self._ran: set[int] = set()  # modules that computed since the last step
        self._read: set[int] = set()  # stacked tensors the grouped path read
        self._hooked: dict[int, set[int]] = {}  # rows marked by a member read on its own, per bucket
        try:
            self._hold(decayed)
        except BaseException:  # out of memory part way: the parameters get their storage back
            self.release()
            raise

    def _hold(self, decayed: set[int]) -> None:
        found: dict[tuple, list[list]] = {}  # per (device, dtype): units, each one entry or a span's
        stacks = self.stacks
        for stack in stacks:
            members = list(stack.members.values())
            held_runs, entries, groups = set(), [], []
            for run in stack._runs[True]:
                group = [members[i] for i in run]
                held = _group_parameters(group) if group_key(group[0]) is not None else None
                if not held:
                    continue
                held_runs.add(run[0])
                groups.append(group)
                entries += [(owners, name, params, group * copies) for owners, name, params, copies in held]
            for unit in _spanned(groups, entries):
                params = unit[0][2][0]
                found.setdefault((params.device, params.dtype), []).append(unit)
            stack.held_runs = frozenset(held_runs)
            stack.on_ran = self._modules_ran
        for key, units in found.items():
            self.buckets.append(self._bucket(key, units, decayed))
        self.held = {id(p) for b in self.buckets for s in b.stacked for p in s.params}

    def _bucket(self, key: tuple, units: list[list], decayed: set[int]) -> Bucket:
        device, dtype = key
        # each unit 64-byte aligned, as a tensor of its own would be (see .flat); a span's stacked
        # tensors one right after another, so that one tensor can view them all
        sizes = [sum(len(params) * params[0].numel() for _, _, params, _ in unit) for unit in units]
        starts, end = aligned_starts(sizes, units[0][0][2][0].element_size())
        flat = torch.zeros(end, device=device, dtype=dtype)
        grad = torch.zeros_like(flat)
        bucket = Bucket(holder=nn.Parameter(flat))
        bucket.holder.grad = grad
        segments: list[tuple[int, int]] = []  # (row, length) in element order; row -1: a gap
        rows, decays = 0, []
        for unit, start, stop in zip(units, starts, [*starts[1:], end], strict=True):
            leaves = []
            for owners, name, params, group in unit:
                shape, n = params[0].shape, params[0].numel()
                span = slice(start, start + len(params) * n)
                flipped = held_transposed(owners[0], name)
                layout = (len(params), *held_shape(shape, flipped))
                leaf = nn.Parameter(flat[span].view(layout))
                leaf.grad = grad[span].view(layout)
                with torch.no_grad():
                    for i, p in enumerate(params):
                        row = as_member(leaf.detach()[i], shape, flipped)
                        row.copy_(p)
                        p.data = row  # shares the stacked tensor's storage
                        self._repointed.append(p)
                rows_held = list(range(rows, rows + len(params)))
                held = Stacked(leaf, params, owners, group, name, start, rows_held, flipped)
                key = (id(owners[0]), name)
                HELD[key] = Held(leaf, tuple(owners), self._reader(leaf), flipped)
                self._keys.append(key)
                for i, p in enumerate(params):
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._moved(bucket, held, i)))
                segments += [(row, n) for row in held.rows]
                rows += len(params)
                decays += [id(p) in decayed for p in params]
                bucket.stacked.append(held)
                leaves.append(leaf)
                start = span.stop
            if len(leaves) > 1:  # a span: one tensor over them all, its gradient theirs
                whole = slice(start - sum(leaf.numel() for leaf in leaves), start)
                layout = (sum(len(leaf) for leaf in leaves), *leaves[0].shape[1:])
                spanning = nn.Parameter(flat[whole].view(layout))
                spanning.grad = grad[whole].view(layout)
                key = tuple(id(leaf) for leaf in leaves)
                SPANS[key] = tuple(leaves), spanning
                self._spans.append(key)
            if stop > start:
                segments.append((-1, stop - start))  # the gap to the next aligned start
        bucket.steps = torch.zeros(rows + 1, device=device, dtype=torch.float32)
        bucket.decays = torch.tensor([*decays, False], device=device) if any(decays) else None
        bucket.chunks = _chunks([(rows if row < 0 else row, n) for row, n in segments], device)
        return bucket

    # -- which rows step -------------------------------------------------------------------

    def _modules_ran(self, modules: list[nn.Module]) -> None:
        self._ran.update(id(m) for m in modules)

    def _reader(self, leaf: torch.Tensor) -> Callable[[], None]:
        return lambda: self._read.add(id(leaf))

    def _moved(self, bucket: Bucket, held: Stacked, i: int) -> Callable[[nn.Parameter], None]:
        """The hook of a member parameter read on its own: its gradient joins its row's."""

        def hook(p: nn.Parameter) -> None:
            with torch.no_grad():
                held.member(bucket.holder.grad, i).add_(p.grad)
            p.grad = None
            self._hooked.setdefault(id(bucket), set()).add(held.rows[i])

        return hook

    def _used_rows(self, bucket: Bucket) -> list[int]:
        """The rows that step: of modules that computed, where the grouped path read the stacked
        tensor, and those a member parameter read on its own marked."""
        used = set(self._hooked.get(id(bucket), ()))
        for held in bucket.stacked:
            if id(held.leaf) in self._read:
                used.update(row for row, m in zip(held.rows, held.modules, strict=True) if id(m) in self._ran)
        return sorted(used)

    @property
    def holders(self) -> list[nn.Parameter]:
        """One parameter per flat tensor, its gradient the flat gradient: what clipping sees."""
        return [b.holder for b in self.buckets]

    def holds(self, p: torch.Tensor) -> bool:
        return id(p) in self.held

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket.holder.grad.zero_()
        self._ran.clear()
        self._read.clear()
        self._hooked.clear()

    # -- AdamW, masked per row -------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> None:
        """AdamW on the rows that computed since the last ``zero_grad`` (torch's update, element
        for element); the other rows, their moments and step counts stay as they are."""
        beta1, beta2 = betas
        for bucket in self.buckets:
            rows = self._used_rows(bucket)
            if not rows:
                continue
            if bucket.exp_avg is None:
                bucket.exp_avg = torch.zeros_like(bucket.holder.detach())
                bucket.exp_avg_sq = torch.zeros_like(bucket.holder.detach())
            flags = [False] * len(bucket.steps)
            for row in rows:
                flags[row] = True
            used = torch.tensor(flags, device=bucket.steps.device)
            bucket.steps += used
            step = bucket.steps.clamp(min=1)  # an unused row's update is zeroed below
            # per row: what multiplies each of its elements (1 or 0 where it does not step)
            decays = None if bucket.decays is None or not weight_decay else used & bucket.decays
            decay = None if decays is None else torch.where(decays, 1 - lr * weight_decay, 1.0)
            first = torch.where(used, 1 - beta1, 0.0)
            second = torch.where(used, beta2, 1.0)
            size = torch.where(used, lr / (1 - beta1**step), 0.0)
            root = (1 - beta2**step).sqrt()
            for chunk in bucket.chunks:
                p, g = bucket.holder.detach()[chunk.span], bucket.holder.grad[chunk.span]
                m, v = bucket.exp_avg[chunk.span], bucket.exp_avg_sq[chunk.span]
                row = chunk.rows.repeat_interleave(chunk.lengths, output_size=len(p))  # each element's

                def each(
                    per_row: torch.Tensor, row: torch.Tensor = row, dtype: torch.dtype = p.dtype
                ) -> torch.Tensor:
                    expanded = per_row.index_select(0, row)
                    return expanded if expanded.dtype == dtype else expanded.to(dtype)  # bf16 weights

                if decay is not None:
                    p.mul_(each(decay))
                m.lerp_(g, each(first))
                v.mul_(each(second)).addcmul_(g, g, value=1 - beta2)
                p.addcdiv_(m * each(size), (v.sqrt() / each(root)).add_(eps), value=-1)

    # -- state per member parameter ----------------------------------------------------------

    def member_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """AdamW's state of every member parameter that has one (stepped at least once), by the
        parameter's id: its step count and its rows of the moments (views)."""
        out = {}
        for bucket in self.buckets:
            if bucket.exp_avg is None:
                continue
            steps = bucket.steps.cpu()
            for held in bucket.stacked:
                for i, (p, row) in enumerate(zip(held.params, held.rows, strict=True)):
                    if steps[row] == 0:
                        continue
                    out[id(p)] = {
                        "step": steps[row].clone(),
                        "exp_avg": held.member(bucket.exp_avg, i),
                        "exp_avg_sq": held.member(bucket.exp_avg_sq, i),
                    }
        return out

    @torch.no_grad()
    def load_member_state(self, state: dict[int, dict[str, torch.Tensor]]) -> None:
        """The inverse of :meth:`member_state`; a member without a saved state starts afresh."""
        for bucket in self.buckets:
            bucket.steps.zero_()
            bucket.exp_avg = torch.zeros_like(bucket.holder.detach())
            bucket.exp_avg_sq = torch.zeros_like(bucket.holder.detach())
            for held in bucket.stacked:
                for i, (p, row) in enumerate(zip(held.params, held.rows, strict=True)):
                    values = state.get(id(p))
                    if values is None:
                        continue
                    bucket.steps[row] = float(values["step"])
                    held.member(bucket.exp_avg, i).copy_(values["exp_avg"].reshape(p.shape))
                    held.member(bucket.exp_avg_sq, i).copy_(values["exp_avg_sq"].reshape(p.shape))

    def release(self) -> None:
        """Give every member parameter its own storage again and detach from the stacks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for key in self._keys:
            HELD.pop(key, None)
        self._keys.clear()
        for key in self._spans:
            SPANS.pop(key, None)
        self._spans.clear()
        with torch.no_grad():
            for p in self._repointed:  # laid out as a parameter of its own (a held row may be transposed)
                p.data = p.data.clone(memory_format=torch.contiguous_format)
        self._repointed.clear()
        for stack in self.stacks:
            stack.held_runs = frozenset()
            stack.on_ran = None


def _chunks(segments: list[tuple[int, int]], device: torch.device) -> list[Chunk]:
    """``segments`` (row, length), in element order, cut into chunks of whole segments of at most
    :data:`CHUNK` elements (a longer segment is a chunk of its own)."""
    chunks, start, current = [], 0, []
    for row, n in [*segments, (None, 0)]:
        size = sum(length for _, length in current)
        if current and (row is None or size + n > CHUNK):
            rows = torch.tensor([r for r, _ in current], dtype=torch.long, device=device)
            lengths = torch.tensor([length for _, length in current], dtype=torch.long, device=device)
            chunks.append(Chunk(slice(start, start + size), rows, lengths))
            start, current = start + size, []
        if row is not None:
            current.append((row, n))
    return chunks


def stacks_grouped_on(model: nn.Module, device: torch.device) -> list[nn.Module]:
    """The model's routed and parallel stacks that run their groups on ``device`` (the grouped path)."""
    stacks = getattr(model, "stacks", {}).values()
    return [s for s in stacks if s.composition in ("routed", "parallel") and s.groups_on(device)]


def stack_modules(model: nn.Module, device: torch.device, decayed: set[int]) -> StackedParameters | None:
    """The grouped members' trainable parameters of ``model`` held stacked (None if there are none).
    ``decayed``: ids of the parameters with weight decay."""
    stacks = stacks_grouped_on(model, torch.device(device))
    held = StackedParameters(stacks, decayed) if stacks else None
    if held is not None and not held.buckets:
        held.release()
        return None
    return held


def for_eager_training(
    model: nn.Module, train: Any, device: torch.device, distributed: bool
) -> StackedParameters | None:
    """What ``train`` (a ``[train]`` section) holds stacked: eagerly (not ``compile``, which trains
    flat, :mod:`.flat`), on one process, with fp32 moments stepped after backward, the trainable
    parameters of the groups the stacks run on ``device``; else None."""
    if train.compile or train.optimizer_in_backward or train.optimizer_state != "fp32" or distributed:
        return None
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay, _ = decay_split(model, trainable)
    return stack_modules(model, device, {id(p) for p in decay})
