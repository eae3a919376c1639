"""Grouped modules' parameters held stacked, for eager training on the grouped path.

A group of modules (:mod:`dharma_kernel.grouped`) computes each block with one batched
product over its members' weights stacked ``[M, ...]``. Stacked afresh in every forward, that
costs a copy forward, a split backward and a gradient per member; and AdamW then steps over
a thousand small tensors one by one. Here each of a group's parameters is held as one stacked
tensor that the grouped path reads as it is (:func:`~dharma_kernel.grouped.stacked`); each
member's own parameter is a row of it (its storage a view), so the model that is evaluated,
saved and exported is the one being trained, under its own names. The stacked tensors of
one weight-decay kind are views of one flat tensor, their gradients of one flat gradient,
and AdamW steps each flat tensor at once.

Exact: AdamW is per parameter, so a member that did not compute (under exact routing, one no
token chose) must be left as it is, moments and step count too, as torch's AdamW leaves a
parameter without a gradient. The update is masked per member parameter (a row): each row
has its own step count, and only the rows whose module computed since the last step move
(the stack says which, :attr:`~dharma_kernel.stack.ModuleStack.on_ran`). A member parameter
read outside its group (a module run alone) gets its gradient as any parameter does; a hook
moves it into its row and marks the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..grouped import STACKED, group_key
from .optim import decay_split

# Each stacked tensor starts on a 64-byte boundary of its flat tensor, as a tensor of its own
# would: kernels take other (vectorised) paths, and sum in another order, on unaligned data.
ALIGN_BYTES = 64


@dataclass
class Stacked:
    """One parameter of a group's members held stacked: ``leaf [M, ...]`` (what the grouped path
    reads and autograd accumulates into), the member parameters (row views of it), the blocks
    that own them, and the parameter name."""

    leaf: nn.Parameter
    params: list[nn.Parameter]
    owners: list[nn.Module]
    name: str
    start: int  # first element in its bucket's flat tensor
    rows: list[int]  # each member parameter's row (its step count) in the bucket


@dataclass
class Bucket:
    """The stacked tensors of one (device, dtype, weight decay): ``holder`` wraps the flat tensor
    (its ``grad``: the flat gradient), so clipping sees one tensor; ``steps``: AdamW's step count
    per row, one more for the gaps (never stepped); ``row_of``: each element's row."""

    holder: nn.Parameter
    decay: bool
    stacked: list[Stacked] = field(default_factory=list)
    steps: torch.Tensor | None = None
    row_of: torch.Tensor | None = None
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return len(self.steps) - 1


def _stackable(members: list[nn.Module]) -> list[tuple[list[nn.Module], str, list[nn.Parameter]]]:
    """Each parameter of a group's members as (owning blocks, name, parameters), those that can be
    stacked: trainable in every member, of one shape, dtype and device."""
    subs = [dict(m.named_modules()) for m in members]
    out = []
    for path in subs[0]:
        owners = [s.get(path) for s in subs]
        if any(o is None for o in owners):
            continue
        for name, _ in owners[0].named_parameters(recurse=False):
            params = [getattr(o, name, None) for o in owners]
            if not all(isinstance(p, nn.Parameter) and p.requires_grad for p in params):
                continue
            if len({(tuple(p.shape), p.dtype, p.device) for p in params}) == 1:
                out.append((owners, name, params))
    return out


class StackedParameters:
    """The grouped members' trainable parameters held stacked (see the module docstring)."""

    def __init__(self, stacks: list[nn.Module], decayed: set[int]) -> None:
        self.stacks = stacks
        self._row_of_module: dict[int, list[tuple[Bucket, int]]] = {}
        self._marked: dict[int, set[int]] = {}
        self._hooks: list = []
        found: dict[tuple, list[tuple[list[nn.Module], str, list[nn.Parameter]]]] = {}
        self._modules_of: dict[int, list[nn.Module]] = {}
        for stack in stacks:
            members = list(stack.members.values())
            for run in stack._runs[True]:
                group = [members[i] for i in run]
                if len(group) < 2 or group_key(group[0]) is None:
                    continue
                for owners, name, params in _stackable(group):
                    p = params[0]
                    found.setdefault((p.device, p.dtype, id(p) in decayed), []).append((owners, name, params))
                    self._modules_of[id(params[0])] = group
        self.buckets = [self._bucket(key, entries) for key, entries in found.items()]
        self.held = {id(p) for b in self.buckets for s in b.stacked for p in s.params}
        for stack in stacks:
            stack.whole_groups = stack.composition == "routed"
            stack.on_ran = self._ran

    def _bucket(self, key: tuple, entries: list) -> Bucket:
        device, dtype, decay = key
        step = max(1, ALIGN_BYTES // torch.tensor([], dtype=dtype).element_size())
        starts, end = [], 0
        for _, _, params in entries:
            starts.append(end)
            end = -(-(end + len(params) * params[0].numel()) // step) * step
        flat = torch.zeros(end, device=device, dtype=dtype)
        grad = torch.zeros_like(flat)
        bucket = Bucket(holder=nn.Parameter(flat), decay=decay)
        bucket.holder.grad = grad
        row_index = torch.full((end,), -1, dtype=torch.long)
        rows = 0
        for (owners, name, params), start in zip(entries, starts, strict=True):
            shape, n = params[0].shape, params[0].numel()
            span = slice(start, start + len(params) * n)
            leaf = nn.Parameter(flat[span].view(len(params), *shape))
            leaf.grad = grad[span].view(len(params), *shape)
            with torch.no_grad():
                for i, p in enumerate(params):
                    leaf[i].copy_(p)
                    p.data = leaf.detach()[i]  # shares the stacked tensor's storage
            held = Stacked(leaf, params, owners, name, start, list(range(rows, rows + len(params))))
            for i, (owner, p) in enumerate(zip(owners, params, strict=True)):
                vars(owner).setdefault(STACKED, {})[name] = (leaf, owners)
                row_index[start + i * n : start + (i + 1) * n] = rows + i
                self._hooks.append(p.register_post_accumulate_grad_hook(self._moved(bucket, held, i)))
            group = self._modules_of[id(params[0])]
            for module, row in zip(group, held.rows, strict=True):
                self._row_of_module.setdefault(id(module), []).append((bucket, row))
            rows += len(params)
            bucket.stacked.append(held)
        bucket.row_of = torch.where(row_index < 0, rows, row_index).to(device)  # gaps: the last row
        bucket.steps = torch.zeros(rows + 1, device=device, dtype=torch.float32)
        return bucket

    # -- which rows step -------------------------------------------------------------------

    def _ran(self, modules: list[nn.Module]) -> None:
        for module in modules:
            for bucket, row in self._row_of_module.get(id(module), ()):
                self._marked.setdefault(id(bucket), set()).add(row)

    def _moved(self, bucket: Bucket, held: Stacked, i: int):
        """The hook of a member parameter read on its own: its gradient joins its row's."""

        def hook(p: nn.Parameter) -> None:
            with torch.no_grad():
                held.leaf.grad[i].add_(p.grad)
            p.grad = None
            self._marked.setdefault(id(bucket), set()).add(held.rows[i])

        return hook

    @property
    def holders(self) -> list[nn.Parameter]:
        """One parameter per flat tensor, its gradient the flat gradient: what clipping sees."""
        return [b.holder for b in self.buckets]

    def holds(self, p: torch.Tensor) -> bool:
        return id(p) in self.held

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket.holder.grad.zero_()
        self._marked.clear()

    # -- AdamW, masked per row -------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> None:
        """AdamW on the rows whose module computed since the last ``zero_grad`` (torch's update,
        element for element); the other rows, moments and step counts stay as they are."""
        beta1, beta2 = betas
        for bucket in self.buckets:
            marked = self._marked.get(id(bucket))
            if not marked:
                continue
            p, g = bucket.holder.detach(), bucket.holder.grad
            if bucket.exp_avg is None:
                bucket.exp_avg, bucket.exp_avg_sq = torch.zeros_like(p), torch.zeros_like(p)
            used = torch.zeros(bucket.rows + 1, dtype=torch.bool)
            used[sorted(marked)] = True
            used = used.to(p.device)
            bucket.steps += used
            mask = used[bucket.row_of]
            step = bucket.steps[bucket.row_of].clamp(min=1)  # an unused row's update is zeroed below
            if bucket.decay and weight_decay:
                p.mul_(torch.where(mask, 1 - lr * weight_decay, 1.0))
            bucket.exp_avg.lerp_(g, torch.where(mask, 1 - beta1, 0.0))
            bucket.exp_avg_sq.mul_(torch.where(mask, beta2, 1.0)).addcmul_(g, g, value=1 - beta2)
            step_size = torch.where(mask, lr / (1 - beta1**step), 0.0)
            denom = (bucket.exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()).add_(eps)
            p.addcdiv_(bucket.exp_avg * step_size, denom, value=-1)

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
                n = held.params[0].numel()
                for i, (p, row) in enumerate(zip(held.params, held.rows, strict=True)):
                    if steps[row] == 0:
                        continue
                    at = slice(held.start + i * n, held.start + (i + 1) * n)
                    out[id(p)] = {
                        "step": steps[row].clone(),
                        "exp_avg": bucket.exp_avg[at].view(p.shape),
                        "exp_avg_sq": bucket.exp_avg_sq[at].view(p.shape),
                    }
        return out

    @torch.no_grad()
    def load_member_state(self, state: dict[int, dict[str, torch.Tensor]]) -> None:
        """The inverse of :meth:`member_state`; a member without a saved state starts afresh."""
        for bucket in self.buckets:
            bucket.steps.zero_()
            bucket.exp_avg, bucket.exp_avg_sq = (
                torch.zeros_like(bucket.holder),
                torch.zeros_like(bucket.holder),
            )
            for held in bucket.stacked:
                n = held.params[0].numel()
                for i, (p, row) in enumerate(zip(held.params, held.rows, strict=True)):
                    values = state.get(id(p))
                    if values is None:
                        continue
                    at = slice(held.start + i * n, held.start + (i + 1) * n)
                    bucket.steps[row] = float(values["step"])
                    bucket.exp_avg[at] = values["exp_avg"].reshape(-1).to(bucket.exp_avg)
                    bucket.exp_avg_sq[at] = values["exp_avg_sq"].reshape(-1).to(bucket.exp_avg_sq)

    def release(self) -> None:
        """Give every member parameter its own storage again and detach from the stacks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        with torch.no_grad():
            for bucket in self.buckets:
                for held in bucket.stacked:
                    for owner, p in zip(held.owners, held.params, strict=True):
                        p.data = p.data.clone()
                        vars(owner).pop(STACKED, None)
        for stack in self.stacks:
            stack.whole_groups = False
            stack.on_ran = None


def stacks_grouped_on(model: nn.Module, device: torch.device) -> list[nn.Module]:
    """The model's routed and parallel stacks that run their groups on ``device`` (the grouped path)."""
    stacks = getattr(model, "stacks", {}).values()
    return [s for s in stacks if s.composition in ("routed", "parallel") and s.groups_on(device)]


def stack_modules(model: nn.Module, device: torch.device, decayed: set[int]) -> StackedParameters | None:
    """The grouped members' trainable parameters of ``model`` held stacked (None if there are none).
    ``decayed``: ids of the parameters with weight decay (one flat tensor never mixes the two)."""
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
