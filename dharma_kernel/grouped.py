"""Grouped execution: modules of one family and config at one insertion point, computed as one.

Every module keeps its own parameters (saved models keep their names); per forward the
group's weights are stacked ``[M, ...]`` and each block computes all the group's tokens,
padded to the group's largest share, with one batched product (``torch.bmm``), where
running modules one by one costs a chain of small ops per module.
The results equal the per-module path (``DharmaModule.forward_tokens``, the reference) to
float rounding.

A family opts in by defining ``grouped_tokens(members, x, where)`` in the same class that
defines its computation (``forward_tokens``, ``delta``), on ``x [M, most, H]`` (``where``: the
:class:`GroupInput`, for the blocks that read other positions); a plugin class that overrides
either without its own ``grouped_tokens`` runs alone, as before (see :func:`group_key`).
Attention (:func:`attention`) runs as one call for all the group's modules.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import allowed_keys, attend, with_past
from .protocol import DharmaModule, ModuleContext, TokenOutput

# What a module's own computation is defined by: the first class in its MRO that defines one.
_COMPUTATION = ("forward", "forward_tokens", "delta", "grouped_tokens")


def group_key(module: DharmaModule) -> tuple | None:
    """Modules with equal keys can run as one group; None: the module runs alone."""
    for cls in type(module).__mro__:
        defined = [name for name in _COMPUTATION if name in vars(cls)]
        if defined:
            if "grouped_tokens" not in defined:
                return None
            return cls, module.config, module.hidden_size
    return None


class Groups:
    """The tokens of ``len(counts)`` modules, concatenated module after module (``counts`` each),
    laid out padded ``[M, most, ...]``: every block is then one batched product (``torch.bmm``)
    over the modules, their stacked parameters broadcast along the tokens."""

    def __init__(self, counts: Sequence[int], device: torch.device) -> None:
        self.counts = list(counts)
        self.most = max(self.counts)
        sizes = on_device(self.counts, device)
        every = torch.arange(len(self.counts), device=device)
        module = torch.repeat_interleave(every, sizes, output_size=sum(self.counts))  # no wait for a size
        first = (torch.cumsum(sizes, 0) - sizes)[module]  # its module's first token
        # each token's row in the padded [M * most] layout
        self.slots = torch.arange(len(module), device=device) - first + module * self.most

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` module after module -> ``[M, most, ...]``, zeros after each module's tokens."""
        padded = x.new_zeros(len(self.counts) * self.most, *x.shape[1:]).index_copy(0, self.slots, x)
        return padded.view(len(self.counts), self.most, *x.shape[1:])

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`pad`."""
        return y.flatten(0, 1).index_select(0, self.slots)


def flattened(x: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """``x`` with its leading axes flattened into one, ``dims`` axes left: ``[B, T, H] -> [B * T, H]``
    (``dims=1``: ``[B, T] -> [B * T]``); a view in one op where it can be (``flatten`` takes two),
    else a copy."""
    if x.dim() == dims:
        return x
    shape = (-1, *x.shape[x.dim() - dims + 1 :])
    return x.view(shape) if x.is_contiguous() else x.reshape(shape)


@dataclass
class GroupInput:
    """What a group's modules read besides their tokens ``x [M, C, H]``: the stack's input
    ``hidden [B, T, H]``, its context ``ctx`` (mask, cached past, shared results; no rows), and
    ``rows [M * C]``, the token of ``hidden.flatten(0, 1)`` at each of the group's slots, row after
    row, each module's ascending (attention regroups them by sequence). ``real [M * C]``: which
    slots hold a token (None: all do); an empty slot (past a module's tokens) has some token's
    row, computes on zeros, and its output is dropped. ``fixed``: the slots are fixed capacity's,
    and no block may read a count back to the host."""

    hidden: torch.Tensor
    ctx: ModuleContext
    rows: torch.Tensor
    slots: int  # C
    real: torch.Tensor | None = None
    fixed: bool = False

    def pick(self, values: torch.Tensor) -> torch.Tensor:
        """``values [B, T, ...]`` at the group's slots: ``[M, C, ...]``."""
        picked = flattened(values, values.dim() - 1).index_select(0, self.rows)
        return picked.view(-1, self.slots, *picked.shape[1:])

    def repeated(self, times: int) -> GroupInput:
        """The same slots for ``times`` copies of the group's modules, copy after copy: how the
        views of multi-view modules attend in one call (:func:`multi_view`)."""
        real = None if self.real is None else torch.cat([self.real] * times)
        return GroupInput(self.hidden, self.ctx, torch.cat([self.rows] * times), self.slots, real, self.fixed)


@dataclass
class Held:
    """A parameter of a group's blocks held stacked (dharma_kernel.train.stacked): the stacked
    tensor, the blocks of its rows in order, what to tell when training reads it, and whether
    its rows are the members' parameters transposed. Each is held the way the grouped blocks
    read it, so that read is no op (and no op backward): a vector parameter (one axis)
    ``[M, 1, n]``, as :func:`along_tokens` reads it; a linear layer's weight ``[out, in]``
    transposed, ``[M, in, out]``, as :func:`linear` multiplies by it (see :func:`held_shape`)."""

    leaf: torch.Tensor
    owners: tuple[nn.Module, ...]
    read: Callable[[], None]
    transposed: bool = False


# The parameters held stacked, by (id of the first block, parameter name). The blocks are kept, so
# an id cannot be reused while it is held; a copy of the model (copy.deepcopy) has other blocks,
# finds nothing here, and stacks its own parameters in every forward.
HELD: dict[tuple[int, str], Held] = {}


# Stacked tensors laid out one right after another (dharma_kernel.train.stacked), by the ids of
# their held leaves in order: the leaves (kept, so their ids are not reused while spanned) and one
# tensor that views them all, its gradient theirs (a view of the same gradient), read where
# grouped code reads them together (:func:`~dharma_kernel.attention_pool.attend_together`).
SPANS: dict[tuple[int, ...], tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}


def held_transposed(owner: nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` of ``owner`` is held transposed: a linear layer's weight."""
    return isinstance(owner, nn.Linear) and name == "weight"


def held_shape(shape: torch.Size, transposed: bool = False) -> tuple[int, ...]:
    """How a member parameter of ``shape`` is laid out in its stacked tensor (after the member axis)."""
    if transposed:
        return shape[1], shape[0]
    return (1, *shape) if len(shape) == 1 else tuple(shape)


def as_member(row: torch.Tensor, shape: torch.Size, transposed: bool) -> torch.Tensor:
    """A row of a stacked tensor (laid out by :func:`held_shape`) as a member parameter of
    ``shape``: a view of it."""
    return row.t() if transposed else row.view(shape)


def stacked(blocks: Sequence[nn.Module], name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The parameter ``name`` of every block, stacked ``[M, ...]`` (in ``dtype`` if given): the
    tensor that holds them stacked, if one holds exactly these blocks' in this order, else a copy."""
    return _stacked(blocks, name, dtype, along=False)


def along_tokens(blocks: Sequence[nn.Module], name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``stacked`` with a token axis: ``[M, 1, ...]``, broadcast over a padded group's tokens."""
    return _stacked(blocks, name, dtype, along=True)


def transposed(blocks: Sequence[nn.Module], name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``stacked`` with each matrix transposed: ``[M, in, out]`` of weights ``[out, in]``."""
    return _stacked(blocks, name, dtype, along=False, flip=True)


def _stacked(
    blocks: Sequence[nn.Module], name: str, dtype: torch.dtype | None, along: bool, flip: bool = False
) -> torch.Tensor:
    held = _held(blocks, name) if HELD else None
    if held is None:
        weights = torch.stack([getattr(block, name) for block in blocks], dim=0)
        weights = weights.unsqueeze(1) if along else weights
        weights = weights.transpose(1, 2) if flip else weights
    else:
        if len(held) == 1:
            weights = held[0].leaf
        else:
            span = SPANS.get(tuple(id(h.leaf) for h in held))
            weights = torch.cat([h.leaf for h in held]) if span is None else span[1]
        if held[0].transposed != flip:  # a matrix, held [M, in, out] (held_shape)
            weights = weights.transpose(1, 2)
        vector = getattr(blocks[0], name).dim() == 1  # held [M, 1, n]
        if vector != along:
            weights = weights.squeeze(1) if vector else weights.unsqueeze(1)
    return weights if dtype is None or weights.dtype == dtype else weights.to(dtype)


def _held(blocks: Sequence[nn.Module], name: str, read: bool = True) -> list[Held] | None:
    """What holds the parameter ``name`` of ``blocks`` stacked, one after another (several: the
    views of multi-view modules); None unless they hold exactly these blocks'. ``read``: tell each
    that training reads it (with autograd on)."""
    found, at = [], 0
    while at < len(blocks):
        held = HELD.get((id(blocks[at]), name))
        if held is None or len(held.owners) > len(blocks) - at:
            return None
        if not all(map(operator.is_, held.owners, blocks[at : at + len(held.owners)])):
            return None
        found.append(held)
        at += len(held.owners)
    if read and torch.is_grad_enabled():
        for held in found:
            held.read()
    return found


def linear(layers: Sequence[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """Each module's linear layer on its tokens ``x [M, most, in]``."""
    y = torch.bmm(x, transposed(layers, "weight", x.dtype))
    # an add, not baddbmm: that copies the bias into its output first (two fewer ops, as many kernels)
    return y if layers[0].bias is None else y + along_tokens(layers, "bias", x.dtype)


def layer_norm(norms: Sequence[nn.LayerNorm], x: torch.Tensor) -> torch.Tensor:
    first = norms[0]
    return _affine(norms, _normalized(x, tuple(first.normalized_shape), first.eps))


def _affine(norms: Sequence[nn.LayerNorm], y: torch.Tensor) -> torch.Tensor:
    """Each layer norm's scale and shift of its normalized input ``y``."""
    return y * along_tokens(norms, "weight") + along_tokens(norms, "bias")


_SHARING = threading.local()


@contextmanager
def sharing_normalization() -> Iterator[None]:
    """Within: each input is normalized once, however many of a group's blocks normalize it (a
    detector and an adapter read the same tokens); each block applies its own scale and shift.
    Scoped to one group's forward, eager only (see :func:`grouped_forward`; across a stack's
    groups, only the sequence the attention families read keys from is normalized once:
    :func:`_sequence_normalized`)."""
    outer = getattr(_SHARING, "seen", None)
    _SHARING.seen = {}
    try:
        yield
    finally:
        _SHARING.seen = outer


class Gated:
    """A group's output ``delta = score[..., None] * ungated`` (the built-in families', see
    :func:`gated`), the product not yet taken: a routed stack multiplies each slot's gate (its
    ``score``) into its routing weight, one product over all its slots where each group's would
    be one over ``[M, C, H]``, forward and backward. Whoever reads ``delta`` (a family that wraps
    a built-in one's ``grouped_tokens``) gets it multiplied, as a :class:`TokenOutput` has it; not
    a dataclass: to change the output, take :func:`applied` first (setting ``score`` here would
    rescale the delta too)."""

    def __init__(self, score: torch.Tensor, ungated: torch.Tensor) -> None:
        self.score, self.ungated = score, ungated
        self.losses: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, torch.Tensor] = {}

    @property
    def delta(self) -> torch.Tensor:
        return self.score[..., None] * self.ungated


def gated(gate: torch.Tensor, delta: torch.Tensor) -> Gated:
    """The output ``gate[..., None] * delta`` with gate ``gate`` (:class:`Gated`)."""
    return Gated(gate, delta)


def applied(out: TokenOutput | Gated) -> TokenOutput:
    """``out`` as a :class:`TokenOutput`, its gate multiplied in if it is :class:`Gated`."""
    return TokenOutput(out.delta, out.score, out.losses, out.metrics) if isinstance(out, Gated) else out


def collected(outs: Sequence[TokenOutput | Gated]) -> tuple[list[torch.Tensor], bool]:
    """The deltas of a stack's ``outs`` and whether they are still to be multiplied by their
    scores: every one :class:`Gated`, their unmultiplied deltas (the stack multiplies the gates
    into its routing weight, one product for all); else each delta as a TokenOutput has it."""
    gated = all(isinstance(out, Gated) for out in outs)
    return [out.ungated if gated else out.delta for out in outs], gated


def grouped_forward(
    members: Sequence[DharmaModule], x: torch.Tensor, where: GroupInput
) -> TokenOutput | Gated:
    """The members' family's ``grouped_tokens`` at their slots ``x [M, C, H]``, each input normalized
    once (:func:`sharing_normalization`; not while torch.compile traces: a context manager of its
    own breaks the graph, and compiled code fuses the normalizations anyway). Maybe :class:`Gated`."""
    sharing = nullcontext() if torch.compiler.is_compiling() else sharing_normalization()
    with sharing:
        return type(members[0]).grouped_tokens(members, x, where)


def _normalized(x: torch.Tensor, shape: tuple[int, ...], eps: float) -> torch.Tensor:
    seen = getattr(_SHARING, "seen", None)
    if seen is None or torch.compiler.is_compiling():  # a frame compiled inside an eager scope too
        return F.layer_norm(x, shape, eps=eps)
    # the tensor itself (kept with its result, so its id is not reused meanwhile) and, outside
    # inference mode (no counter there), its version: changed in place, it is normalized again.
    # Under inference mode, and across a switch of autocast within one group, it is not: no
    # grouped block changes its input in place or switches autocast.
    version = None if x.is_inference() else x._version
    key = (id(x), shape, eps, torch.is_grad_enabled())
    kept = seen.get(key)
    if kept is None or kept[0] is not x or kept[1] != version:
        kept = seen[key] = (x, version, F.layer_norm(x, shape, eps=eps))
    return kept[2]


def adapter(blocks: Sequence[nn.Module], x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.BottleneckAdapter` of each module."""
    h = layer_norm([b.norm for b in blocks], x)
    if extra is not None:
        h = torch.cat([h, extra if extra.dtype == h.dtype else extra.to(h.dtype)], dim=-1)
    return linear([b.up for b in blocks], F.gelu(linear([b.down for b in blocks], h)))


def gated_residual(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.GatedResidual` of each module."""
    h = layer_norm([b.norm for b in blocks], x)
    value, gate = linear([b.value for b in blocks], h), linear([b.gate for b in blocks], h)
    return linear([b.out for b in blocks], value * torch.sigmoid(gate))


def memory(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.MemoryAttention` of each module."""
    query = linear([b.query for b in blocks], layer_norm([b.norm for b in blocks], x))
    keys = stacked(blocks, "keys", x.dtype)  # [M, slots, key_dim]
    scores = torch.bmm(query, keys.transpose(1, 2)) / math.sqrt(keys.shape[-1])
    return torch.bmm(torch.softmax(scores, dim=-1), stacked(blocks, "values", x.dtype))


def detector(blocks: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`~dharma_kernel.blocks.ConceptDetector` of each module: ``(gate, intensity)``."""
    intensity = torch.sigmoid(linear([b.proj for b in blocks], layer_norm([b.norm for b in blocks], x)))
    if blocks[0].mix is None:  # one detector: its own gate (a view: a select's backward is a scatter)
        return intensity.view(intensity.shape[:-1]), intensity
    mix = torch.softmax(along_tokens(blocks, "mix"), dim=-1)
    return (intensity * mix).sum(-1), intensity


# Up to this many keys (batch x positions, cached ones too), a group attends each module's queries
# over every sequence's keys, other sequences masked out: no host read, a few ops. Past it, the
# queries are regrouped by (module, sequence) pair, each over its own sequence's keys, which
# reads each pair's count back to the host: the first form's B-fold attention work and its
# [queries, B * S] mask grow with the batch (a one-off CPU script: 6x and 8x slower forwards at
# batch 16 and 32 x 128, parallel). 2,048 is not a measured crossover; the benchmarks' shapes
# (4 x 64 on the CPU, 8 x 256 on a GPU) stay under it.
EVERY_KEY_LIMIT = 2048


def attention(
    blocks: Sequence[nn.Module], x: torch.Tensor, where: GroupInput, times: int = 1
) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.CausalAttention` of each block at its slots ``x [M, C, H]``,
    ``[len(blocks), C, H]``; ``times``: the blocks are that many copies' worth, each copy at the
    same slots (multi-view: every module's first view, then every second, ...).

    Keys and values at every position of every sequence (cached ones too) for all blocks with
    one product, then one attention call: each block's queries over all its keys, those of other
    sequences masked out (weight exactly zero), or above :data:`EVERY_KEY_LIMIT` keys, each
    (block, sequence) pair's queries over its sequence's (fixed capacity never: no host read).
    Where a stack's attention groups attend together
    (:func:`~dharma_kernel.attention_pool.attend_together`), the result of their one call.
    """
    pool = None if torch.compiler.is_compiling() else where.ctx.shared.get(POOL)
    if pool is not None:
        out = pool.output(blocks, x, where, times)
        if out is not None:
            return out
    if times > 1:
        x, where = torch.cat([x] * times), where.repeated(times)
    return _attention(blocks, x, where)


def _attention(blocks: Sequence[nn.Module], x: torch.Tensor, where: GroupInput) -> torch.Tensor:
    first, (count, slots, _) = blocks[0], x.shape
    heads, kv_heads, head_dim = first.heads, first.kv_heads, first.head_dim
    full = with_past(where.hidden, where.ctx)  # [B, S, H]
    batch, total, _ = full.shape
    normed = _affine([b.norm for b in blocks], _sequence_normalized(blocks[0].norm, full, where.ctx))
    kv = linear([b.key_value for b in blocks], normed)  # [M, B * S, 2 * kv_heads * D]
    q = linear([b.query for b in blocks], layer_norm([b.norm for b in blocks], x))  # [M, C, heads * D]
    every_key = where.fixed or torch.compiler.is_compiling() or batch * total <= EVERY_KEY_LIMIT
    if every_key:  # fixed capacity and compiled code: no host read
        k, v = kv.view(count, batch * total, 2, kv_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = q.view(count, slots, heads, head_dim).transpose(1, 2)  # [M, heads, C, D]
        y = attend(q, k, v, _allowed(where, total).view(count, 1, slots, batch * total))
        y = y.transpose(1, 2).reshape(count, slots, heads * head_dim)
    else:
        k, v = kv.view(count * batch, total, 2, kv_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = _attention_by_sequence(q, k, v, where, (heads, head_dim), total)
    return linear([b.out for b in blocks], y)


# Where a stack's attention groups attend together, the key of their pool in ``ctx.shared``
# (dharma_kernel.attention_pool).
POOL = "attention_pool"


def _sequence_normalized(norm: nn.LayerNorm, full: torch.Tensor, ctx: ModuleContext) -> torch.Tensor:
    """``full [B, S, H]`` normalized as ``[B * S, H]`` (no scale or shift), once for all of a
    stack's attention groups (darshanas and multi-view paths both read keys from it), kept in
    ``ctx.shared`` while the stack runs."""
    key = ("sequence_normalized", tuple(norm.normalized_shape), norm.eps, torch.is_grad_enabled())
    kept = ctx.shared.get(key)
    if kept is None or kept[0] is not full:
        kept = ctx.shared[key] = (full, F.layer_norm(flattened(full), norm.normalized_shape, eps=norm.eps))
    return kept[1]


def _attention_by_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: GroupInput, shape: tuple[int, int], total: int
) -> torch.Tensor:
    """:func:`attention` as one call whose batch is every (module, sequence) pair: the queries
    ``q [M, C, heads * D]`` at real slots, regrouped by pair and padded to the most any pair has,
    over ``k``, ``v [M * B, kv_heads, S, D]``. A padded query sees only the first key, so no
    softmax row is empty; its output is dropped, as are empty slots' (zeros)."""
    (count, slots, width), (heads, head_dim) = q.shape, shape
    batch, length = where.hidden.shape[:2]
    real = None if where.real is None else where.real.nonzero().squeeze(1)  # a host read
    every = torch.arange(count * slots, device=q.device) if real is None else real
    rows = where.rows if real is None else where.rows.index_select(0, real)
    sequence, position = rows // length, rows % length + (total - length)
    pair = every // slots * batch + sequence  # ascending: modules in order, each one's rows ascending
    pairs = Groups(torch.bincount(pair, minlength=count * batch).tolist(), q.device)
    flat = q.flatten(0, 1) if real is None else q.flatten(0, 1).index_select(0, real)
    grouped_q = pairs.pad(flat).view(count * batch, pairs.most, heads, head_dim).transpose(1, 2)
    at = pairs.pad(position[:, None])  # [M * B, most, 1]; 0 (the first key) where padded
    keys = where.ctx.key_mask(length)  # [B, S]
    allowed = allowed_keys(at, None if keys is None else keys.repeat(count, 1)[:, None, :], total)
    y = attend(grouped_q, k, v, allowed[:, None]).transpose(1, 2).reshape(count * batch, pairs.most, width)
    y = pairs.unpad(y)
    if real is not None:
        y = y.new_zeros(count * slots, width).index_copy(0, real, y)
    return y.view(count, slots, width)


def _allowed(where: GroupInput, total: int) -> torch.Tensor:
    """``[M * C, B * S]``: the keys each slot's query sees: its own sequence's, causal, real
    tokens, and always itself (so no row is empty, an empty slot's neither). Up to
    :data:`EVERY_KEY_LIMIT` keys, the rows of one table of every token's, built once per stack
    forward for all its attention groups (under fixed capacity past the limit, each group's own:
    a table of every token's would be the largest tensor of the step; and while compiling)."""
    batch, length = where.hidden.shape[:2]
    # compiled, no shape test (crossing the limit would recompile): each group's own rows
    if torch.compiler.is_compiling() or batch * total > EVERY_KEY_LIMIT:
        return keys_seen(where.rows, where.hidden, where.ctx, total)
    shared = where.ctx.shared
    kept = shared.get("keys_seen")
    if kept is None or kept[0] is not where.hidden or kept[1] != total:
        every = torch.arange(batch * length, device=where.rows.device)
        kept = shared["keys_seen"] = (where.hidden, total, keys_seen(every, where.hidden, where.ctx, total))
    return kept[2].index_select(0, where.rows)


def keys_seen(rows: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext, total: int) -> torch.Tensor:
    """``[len(rows), B * S]``: the keys the query at each of ``rows`` (of ``hidden.flatten(0, 1)``,
    ``hidden [B, T, H]``) sees among all sequences' ``S = total`` positions (cached ones first): its
    own sequence's, causal, real tokens, and always itself."""
    batch, length = hidden.shape[:2]
    sequence = (rows // length)[:, None]  # [N, 1]
    position = (rows % length + (total - length))[:, None]
    key = torch.arange(batch * total, device=rows.device)
    same, key_position = key // total == sequence, key % total  # [N, B * S], [B * S]
    real = ctx.key_mask(length)  # [B, S]
    seen = key_position <= position if real is None else (key_position <= position) & flattened(real, 1)
    return same & (seen | (key_position == position))


def multi_view(blocks: Sequence[nn.Module], x: torch.Tensor, where: GroupInput) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.MultiViewAttention` of each module."""
    weights = torch.softmax(linear([b.mix for b in blocks], layer_norm([b.norm for b in blocks], x)), dim=-1)
    count, views = len(blocks), len(blocks[0].views)
    out = attention(views_in_order(blocks), x, where, views)  # [views * M, C, H]
    out = out.view(views, count, *x.shape[1:]).permute(1, 2, 3, 0)  # [M, C, H, views]
    return (out * weights[:, :, None, :]).sum(-1)


def views_in_order(blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """Every view of every :class:`~dharma_kernel.blocks.MultiViewAttention` of ``blocks``, view after
    view, as :func:`multi_view` attends with them: one group of ``len(blocks) * views``, one call."""
    return [b.views[i] for i in range(len(blocks[0].views)) for b in blocks]


def plan_runs(members: Sequence[DharmaModule], grouped: bool = True) -> list[list[int]]:
    """The members (by index) in runs that compute together: each group of two or more modules with
    equal :func:`group_key`, at the place of its first member, and every other module alone.
    ``grouped=False``: every module alone, in order (the reference path)."""
    keyed: dict[object, list[int]] = {}
    for index, module in enumerate(members):
        key = group_key(module) if grouped else None
        keyed.setdefault(index if key is None else key, []).append(index)
    runs = [indices for indices in keyed.values() if len(indices) > 1]
    together = {index for indices in runs for index in indices}
    singles = [[index] for index in range(len(members)) if index not in together]
    return sorted(runs + singles, key=lambda indices: indices[0])


@dataclass
class Segment:
    """A run's place among a routed stack's slots (see :func:`layout`): the members that compute
    (by index), the slots it spans, its (module, token) pairs (a span of them), and ``most``: the
    most tokens any of its members has, each member's padded to it (0: one module alone, its
    tokens as they are)."""

    members: list[int]
    slots: slice
    pairs: slice
    most: int


@dataclass
class Layout:
    """Where each (module, token) pair of a routed stack computes: its slot ``[P]``, the runs'
    segments in order, and the slots in all. A group's slots are ``[Mg, most]``, row after row,
    those past a member's tokens empty."""

    slot: torch.Tensor
    segments: list[Segment]
    size: int


def layout(
    runs: Sequence[Sequence[int]],
    counts: Sequence[int],
    position: torch.Tensor,
    whole: Collection[int] = (),
) -> Layout:
    """The :class:`Layout` of the (module, token) pairs laid out module after module in the order of
    ``runs`` (``counts`` per module, some zero; ``position [P]``: each pair's module as its place in
    that order). A run computes as a group when two or more of its members have tokens, or when
    its first member is in ``whole`` (then with all its members, those without tokens on empty
    slots); else its one member with tokens computes alone.

    The pairs' inputs are then gathered straight into the padded rows, where padding each group's
    apart costs a dozen ops forward and backward per group; one small table goes to the device for
    all the runs, where building each group's layout apart costs a transfer (on a GPU, a wait).
    """
    offset, segments = [], []  # a pair's slot is its place's offset + its own index among all pairs
    pair = slot = 0
    for indices in runs:
        running = [m for m in indices if counts[m]]
        if running and indices[0] in whole:
            running = list(indices)
        together = len(running) > 1 or (len(running) == 1 and indices[0] in whole)
        most = max(counts[m] for m in running) if together else 0
        rank = {m: r for r, m in enumerate(running)}
        for m in indices:
            offset.append(slot + (rank.get(m, 0) * most if together else 0) - pair)
            if not together and counts[m]:
                segments.append(Segment([m], slice(slot, slot + counts[m]), slice(pair, pair + counts[m]), 0))
                slot += counts[m]
            pair += counts[m]
        if together:
            start, size = pair - sum(counts[m] for m in indices), len(running) * most
            segments.append(Segment(running, slice(slot, slot + size), slice(start, pair), most))
            slot += size
    index = torch.arange(len(position), device=position.device)
    return Layout(index + on_device(offset, position.device).index_select(0, position), segments, slot)


def on_device(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` (ints) as a long tensor on ``device``; to a GPU through pinned memory without
    waiting for the copy (the stream orders it before the ops that read it)."""
    table = torch.tensor(values, dtype=torch.long)
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table.to(device)
