"""A stack of modules at one insertion point, composed sequential, parallel or routed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from . import capacity
from .attention_pool import Slots, attend_together
from .columns import Columns
from .cpu_linear import Linear, plain
from .group_runs import run_groups
from .grouped import (
    POOL,
    GroupInput,
    collected,
    flattened,
    group_key,
    grouped_forward,
    layout,
    on_device,
    plan_runs,
)
from .module_cache import extend_stream, peek_stream
from .protocol import DharmaModule, ModuleContext, ModuleOutput, TokenOutput, computes_tokens
from .routing import concept_evidence

COMPOSITIONS = ("sequential", "parallel", "routed")
# The router's per-token table (see ModuleStack): each vocabulary id's rank-16 code, read out per module.
# Larger vocabularies share rows (id modulo the rows), so the table stays small beside GPT-2's 50,257
# ids: the `lite` preset's 5% budget holds, and the router's linear part tells sharing ids apart.
TOKEN_PRIOR_RANK, TOKEN_TABLE_ROWS = 16, 4096


def module_key(ref: str) -> str:
    """``darshanas.vedanta`` -> ``darshanas__vedanta`` (module names cannot hold dots)."""
    return ref.replace(".", "__")


@dataclass
class StackResult:
    """New hidden states, and per module its own score ``[B, T]`` and where it ran ``[B, T]``.

    router_logits: ``[B, T, M]`` (fp32), the router's logit of each module at every token, under
    routed composition: its concept evidence so far in the document (see :mod:`.routing`); its
    sigmoid is the module's concept probability (see DharmaModel). router_hits: the router's
    own per-token logits the evidence is the running maximum of.
    """

    hidden: torch.Tensor
    scores: Mapping[str, torch.Tensor]
    active: Mapping[str, torch.Tensor]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    router_logits: torch.Tensor | None = None
    router_hits: torch.Tensor | None = None


class ModuleStack(nn.Module):
    """Modules applied residually after one transformer block.

    sequential: each module rewrites the output of the previous one.
    parallel: every module reads the same input; their deltas are averaged.
    routed: a per-token router picks ``top_k`` modules, only those run, and their
    deltas are mixed by the renormalised router weights. The router's logits are concept
    evidence (:func:`~dharma_kernel.routing.concept_evidence`): its per-token scores held
    for the rest of the document, so a document's tokens go to the modules of the
    concepts it has raised.
    """

    def __init__(
        self,
        modules: list[DharmaModule],
        composition: str,
        top_k: int,
        hidden_size: int,
        vocab_size: int = 0,
        backbone_gradient: float = 0.25,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        if composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {COMPOSITIONS}, got {composition!r}")
        self.refs = [m.ref() for m in modules]
        self.composition = composition
        self.top_k = top_k
        # Routed, in training: each module computes a fixed number of token slots (dharma_kernel.capacity).
        self.capacity_factor = capacity_factor
        # Routed, outside training: every module computes a slot for every token (fixed capacity with
        # room for all, so the result is exact routing's): no shape depends on the routing, and a
        # compiled decoder traces the stacks whole (`dharma generate --compile`, dharma_kernel.decoding).
        self.every_token_slots = False
        self.members = nn.ModuleDict({module_key(m.ref()): m for m in modules})
        self.router = Linear(hidden_size, len(modules), bias=False) if composition == "routed" else None
        # Routed, with input ids: a per-token table the router adds to its scores. A concept's terms
        # are a few vocabulary ids; a linear map of shared hidden features learns them slowly unless
        # the backbone bends its own features to it (which costs perplexity). The output starts at
        # zero, so a new table changes nothing until trained.
        self.token_prior = self.prior_out = None
        if composition == "routed" and vocab_size:
            rows = min(vocab_size, TOKEN_TABLE_ROWS)
            placeholder = torch.empty(rows, TOKEN_PRIOR_RANK)  # filled below, no global RNG drawn
            self.token_prior = nn.Embedding(rows, TOKEN_PRIOR_RANK, _weight=placeholder)
            self.reset_token_table(rows)
        # How much of the routing loss's gradient reaches the backbone through the router's input.
        self.backbone_gradient = backbone_gradient
        self.stream_base = 0  # first cache stream index; set by the model
        self.gradient_checkpointing = False
        # Every module at every token, unchosen ones weighted zero: the same result without the
        # data-dependent gather and scatter, so graph exporters can trace it (dharma_kernel.export).
        self.dense_routing = False
        # Give modules no token chose a zero gradient (FSDP needs one on every process).
        self.touch_unused = False
        # With touch_unused: per member, whether no token chose it in any forward since the last
        # optimizer step (see train.distributed.drop_idle_gradients).
        self.idle = [True] * len(modules)
        # Refs switched off (ablation): they add nothing to the hidden states, and routed ones
        # compute nothing; scores and routing are unchanged. See DharmaModel.switched_off.
        self.disabled: frozenset[str] = frozenset()
        # Routed and parallel: modules of one family and config run as one group (dharma_kernel.grouped);
        # False runs every module alone, the reference the grouped path is tested against.
        # None (the default) groups on a GPU, where every op is a kernel launch, and runs modules
        # alone on the CPU, where ops are cheap and a group's padding is real compute: seed
        # routed trained at 0.60 of the bare backbone grouped, 0.76 alone (benchmarks/bench_modules.py).
        self.grouped: bool | None = None
        # Set while the members' parameters are held stacked (dharma_kernel.train.stacked):
        # held_runs, the runs (by first member) held: each computes on the grouped path (a group of
        # one too), and under exact routing with all its members when any has tokens (those without
        # on no rows), so their stacked weights are read whole, not gathered;
        # on_ran, told in every forward with autograd on which members computed (got a gradient).
        self.held_runs: frozenset[int] = frozenset()
        self.on_ran: Callable[[list[DharmaModule]], None] | None = None
        # plan_runs depends on the members only: worked out once here, not in every forward
        # (where torch.compile could not trace it and broke the graph).
        self._runs = {grouped: plan_runs(modules, grouped) for grouped in (True, False)}
        self._ranked_on: dict[tuple[bool, torch.device], torch.Tensor] = {}

    def _ranked(self, grouped: bool, device: torch.device) -> torch.Tensor:
        """The members' indices in the run order of ``grouped`` (see ``_runs``), on ``device``: made
        once per order and device."""
        key = (grouped, device)
        if key not in self._ranked_on:
            order = self._runs[grouped]
            self._ranked_on[key] = on_device([m for indices in order for m in indices], device)
        return self._ranked_on[key]

    def ready_for_compile(self, device: torch.device) -> None:
        """Fill what forwards cache (the run orders on ``device``) before torch.compile traces one:
        filled while tracing, the cache fails a guard and the next call compiles again."""
        for grouped in (True, False):
            self._ranked(grouped, device)

    def _grouping(self, hidden: torch.Tensor) -> bool:
        return self.groups_on(hidden.device)

    def groups_on(self, device: torch.device) -> bool:
        """Whether the stack runs its groups together on ``device`` (see ``grouped``)."""
        return device.type == "cuda" if self.grouped is None else self.grouped

    def router_parameters(self) -> list[nn.Parameter]:
        """The stack's own parameters, not its modules': the router and its token table."""
        return [p for name, p in self.named_parameters() if not name.startswith("members.")]

    def reset_token_table(self, rows: int | None = None) -> None:
        """A fresh token table: random codes, a zero read-out (no effect until trained). Also for
        models saved before the table existed. Its own generator: adding the table leaves every
        other weight's initialisation as it was."""
        rows = rows or self.token_prior.num_embeddings
        device, dtype = self.router.weight.device, self.router.weight.dtype
        codes = torch.empty(rows, TOKEN_PRIOR_RANK, device="cpu")
        nn.init.normal_(codes, generator=torch.Generator().manual_seed(len(self.refs)))
        self.token_prior.weight = nn.Parameter(codes.to(device, dtype))
        self.token_prior.num_embeddings = rows
        read_out = torch.zeros(len(self.refs), TOKEN_PRIOR_RANK, device=device, dtype=dtype)
        self.prior_out = nn.Parameter(read_out)

    @property
    def streams(self) -> int:
        """Cache streams needed: one per module input when sequential, else one shared input;
        routed, one more for the router's concept evidence."""
        return {"sequential": len(self.refs), "parallel": 1, "routed": 2}[self.composition]

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        starts: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> StackResult:
        """``starts``: ``[B, T]`` bool, the tokens where a new document begins (end-of-text);
        ``input_ids``: ``[B, T]``, for the router's token table."""
        if self.composition == "sequential":
            return self._sequential(hidden, attention_mask, cache)
        past = self._past(cache, 0, hidden)
        if self.composition == "parallel":
            return self._parallel(hidden, ModuleContext(attention_mask, past))
        hits = self._hits(hidden, input_ids)
        evidence = self._evidence(hits, attention_mask, cache, starts)
        result = self._routed(hidden, attention_mask, past, evidence)
        result.router_hits = hits
        return result

    def _hits(self, hidden: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """The router's per-token scores ``[B, T, M]`` (fp32): a linear map of the normalised hidden
        states (the backbone's scale drifts as it trains), plus the token table's row."""
        read = _scale_gradient(hidden, self.backbone_gradient)
        hits = self.router(F.layer_norm(read, read.shape[-1:])).float()
        if self.token_prior is not None and input_ids is not None:
            rows = input_ids[:, -hits.shape[1] :] % self.token_prior.num_embeddings
            hits = hits + F.linear(self.token_prior(rows), self.prior_out).float()
        return hits

    def _evidence(self, hits, attention_mask, cache, starts) -> torch.Tensor:
        """The router's concept evidence ``[B, T, M]`` (fp32), continued from the cache's last position."""
        real = real_tokens(attention_mask, hits)
        previous = None
        if cache is not None:
            kept = peek_stream(cache, self.stream_base + 1)
            previous = None if kept is None else kept[:, -1]
        evidence = concept_evidence(hits, starts, real, previous, pairwise=self.dense_routing)
        if cache is not None:
            extend_stream(cache, self.stream_base + 1, evidence)
        return evidence

    def _past(self, cache: Cache | None, offset: int, hidden: torch.Tensor) -> torch.Tensor | None:
        return None if cache is None else extend_stream(cache, self.stream_base + offset, hidden)

    def _sequential(self, hidden, attention_mask, cache) -> StackResult:
        result = StackResult(hidden, {}, {})
        for offset, (ref, module) in enumerate(zip(self.refs, self.members.values(), strict=True)):
            ctx = ModuleContext(attention_mask, self._past(cache, offset, result.hidden))
            out = module(result.hidden, ctx)
            if ref not in self.disabled:
                result.hidden = out.hidden
            _record(result, ref, out, out.score, torch.ones_like(out.score, dtype=torch.bool))
        return result

    def _parallel(self, hidden, ctx) -> StackResult:
        result = StackResult(hidden, {}, {})
        delta = torch.zeros_like(hidden)
        members = list(self.members.values())
        every = torch.arange(hidden.shape[0] * hidden.shape[1], device=hidden.device)
        rows = [every] * len(members)
        grouping = self._grouping(hidden)
        together = (
            run_groups(members, hidden, ctx, rows, self._runs[True], self.held_runs) if grouping else {}
        )
        for index, (ref, module) in enumerate(zip(self.refs, members, strict=True)):
            if index in together:
                out = _placed(together[index], hidden)
            else:
                out = module(hidden, ctx)
            if ref not in self.disabled:  # still averaged over all: the others stay as they were
                delta = delta + (out.hidden - hidden)
            _record(result, ref, out, out.score, torch.ones_like(out.score, dtype=torch.bool))
        result.hidden = hidden + delta / len(self.refs)
        if self.on_ran is not None and torch.is_grad_enabled():
            self.on_ran(members)
        return result

    def _routed(self, hidden, attention_mask, past, logits) -> StackResult:
        result = StackResult(hidden, {}, {}, router_logits=logits)
        probs = torch.softmax(logits, dim=-1)
        top_weight, top_index = probs.topk(self.top_k, dim=-1)
        top_weight = top_weight / top_weight.sum(-1, keepdim=True)
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_index, True)
        real = real_tokens(attention_mask, hidden)
        active = picked = chosen & real[..., None]  # [B, T, M]
        if self.dense_routing:
            return self._routed_dense(result, attention_mask, past, top_index, top_weight, active)
        runs = active
        if self.disabled:  # a switched-off module gets no tokens
            on = [ref not in self.disabled for ref in self.refs]
            runs = active & torch.tensor(on, device=active.device)
        members = list(self.members.values())
        size = self._slots_per_module(hidden)
        if size:
            run = self._run_fixed(members, hidden, runs, attention_mask, past, result, size)
            rows, module, delta, score, unused, gated, ran = run
            # where modules ran; a switched-off one keeps the router's choice, as in exact routing
            active = ran | (active & ~runs) if self.disabled else ran
        else:
            rows, module, delta, score, unused, gated = self._run_modules(
                members, hidden, runs, active, attention_mask, past, result
            )
        # scores: a module's own where it ran, zero elsewhere (and where it did not run at all)
        tokens = hidden.shape[0] * hidden.shape[1]
        placed = hidden.new_zeros(len(members) * tokens)
        if delta is not None:
            weights = flattened(top_weight.new_zeros(probs.shape).scatter(-1, top_index, top_weight))
            weight = _as(weights[rows, module], hidden.dtype)
            weight = weight * _as(score, hidden.dtype) if gated else weight  # each slot's gate (Gated)
            delta = _as(delta, hidden.dtype) * weight[:, None]
            result.hidden = flattened(hidden).index_add(0, rows, delta).view_as(hidden)
            # an add, not a copy: an empty capacity slot adds its zero to a real token's score
            placed = score.new_zeros(len(members) * tokens).index_add(0, module * tokens + rows, score)
        result.scores = Columns(self.refs, placed.view(len(members), *hidden.shape[:2]), dim=0)
        result.active = Columns(self.refs, active)
        result.losses["router_balance"] = _balance_loss(probs, picked, real, self.top_k)
        if self.on_ran is not None and torch.is_grad_enabled():
            idle = {id(m) for m in unused}
            self.on_ran([m for m in members if id(m) not in idle])
        if self.touch_unused and torch.is_grad_enabled():
            skipped = {id(m) for m in unused}
            self.idle = [idle and id(m) in skipped for idle, m in zip(self.idle, members, strict=True)]
            if unused:
                zero = sum(p.sum() for m in unused for p in m.parameters() if p.requires_grad) * 0.0
                result.hidden = result.hidden + zero
        return result

    # Under torch.compile this runs eagerly (one graph break each side): which modules run, and on
    # how many tokens, changes every step, and tracing it recompiled each group's code for every new
    # set of members with tokens until dynamo's recompile limit (8) sent it back to eager anyway,
    # after minutes of compiling (37 `lite` modules at two layers).
    @torch.compiler.disable
    def _run_modules(self, members, hidden, runs, active, attention_mask, past, result):
        """Every module with tokens, at its tokens: ``(rows, module, delta, score, unused, gated)``:
        per slot (see :func:`~dharma_kernel.grouped.layout`) the row of ``hidden.flatten(0, 1)`` and
        the module, the deltas ``[S, H]`` and scores ``[S]`` there (None when no module ran), the
        modules that had no token, and whether each delta is still to be multiplied by its score
        (every group's output :class:`~dharma_kernel.grouped.Gated`; else each is multiplied
        here). An empty slot (a group's padding) computes on zeros and its delta and score are
        zero. Modules' own losses and metrics go to ``result``."""
        # Every (module, token) pair that runs, from one nonzero: module after module, a group's
        # members next to each other (dharma_kernel.grouped), each module's tokens ascending. One
        # gather of all their inputs, straight into each group's padded rows, and one scatter of
        # all the deltas, so backward has one of each.
        grouped = self._grouping(hidden)
        order, ranked = self._runs[grouped], self._ranked(grouped, hidden.device)
        pairs = flattened(runs).index_select(1, ranked).t().nonzero()
        module = ranked.index_select(0, pairs[:, 0])
        rows = pairs[:, 1]
        counts = runs.sum((0, 1)).tolist()  # per member (fewer ops than a bincount of `module`)
        held_runs = self.held_runs if grouped else frozenset()  # held runs are the grouped order's
        places = layout(order, counts, pairs[:, 0], whole=held_runs)
        flat, filled, slot_rows, slot_module = flattened(hidden), None, rows, module
        if places.size == len(rows):  # no padding: each pair's slot is its own index
            x = flat.index_select(0, rows)
        else:
            filled = rows.new_zeros(places.size, dtype=torch.bool).index_fill(0, places.slot, True)
            slot_module = module.new_zeros(places.size).index_copy(0, places.slot, module)
            slot_rows = rows.new_zeros(places.size).index_copy(0, places.slot, rows)
            # empty slots read zeros (where, not a product: a non-finite row 0 stays out of them)
            x = torch.where(filled[:, None], flat.index_select(0, slot_rows), 0.0)
        stack_ctx = ModuleContext(attention_mask, past)  # its shared results serve every module
        # one split of each per-slot tensor (a slice per segment is two ops where a split's piece is one)
        sizes = [segment.slots.stop - segment.slots.start for segment in places.segments]
        pieces, row_pieces = x.split(sizes), slot_rows.split(sizes)
        real_pieces = [None] * len(sizes) if filled is None else filled.split(sizes)
        inputs = zip(places.segments, pieces, row_pieces, real_pieces, strict=True)
        groups = {}  # by segment: (members, x [Mg, most, H], where)
        for index, (segment, piece, at, real) in enumerate(inputs):
            if segment.most:
                group = [members[m] for m in segment.members]
                where = GroupInput(hidden, stack_ctx, at, segment.most, real)
                groups[index] = group, piece.view(len(group), segment.most, -1), where
        starts = [places.segments[index].slots.start for index in groups]
        attend_together(list(groups.values()), Slots(x, slot_rows, filled), starts)  # one attention call
        outs = []  # a group's [Mg, most, ...], a module alone's [n, ...]
        for index, (segment, piece) in enumerate(zip(places.segments, pieces, strict=True)):
            if segment.most:
                out = grouped_forward(*groups[index])
                with_tokens = [m for m in segment.members if counts[m]]
                if len(with_tokens) == 1:  # its losses and metrics kept, as when it runs alone
                    _record_extras(result, self.refs[with_tokens[0]], out)
            else:
                (m,) = segment.members
                ctx = ModuleContext(
                    attention_mask, past, active[..., m], rows[segment.pairs], stack_ctx.shared
                )
                out = _at_tokens(members[m], piece, hidden, ctx)
                _record_extras(result, self.refs[m], out)
            outs.append(out)
        # the attention pool refers back to the context: dropped, it goes with it, not by the cycle collector
        stack_ctx.shared.pop(POOL, None)
        unused = [members[m] for m in range(len(members)) if not counts[m]]
        if not outs:
            return slot_rows, slot_module, None, None, unused, False
        deltas, gated = collected(outs)
        delta = torch.cat([flattened(d) for d in deltas])
        score = torch.cat([flattened(out.score, 1) for out in outs])
        if filled is not None:  # where, not a product: an empty slot's output may not be finite
            delta, score = torch.where(filled[:, None], delta, 0.0), torch.where(filled, score, 0.0)
        return slot_rows, slot_module, delta, score, unused, gated

    def _slots_per_module(self, hidden: torch.Tensor) -> int | None:
        """The fixed slot count of every module (see ``_run_fixed``), or None for exact routing."""
        tokens = hidden.shape[0] * hidden.shape[1]
        if self.capacity_factor and self.training:
            return capacity.capacity(tokens, len(self.refs), self.top_k, self.capacity_factor)
        return tokens if self.every_token_slots and not self.training else None

    def _run_fixed(self, members, hidden, runs, attention_mask, past, result, size):
        """``_run_modules`` with fixed capacity (:mod:`.capacity`): every module computes its
        ``size`` slots, a groupable one with its group (alone, as a group of one), so no shape
        depends on the routing. Empty slots are weighted zero. Also returns where each module
        ran, ``[B, T, M]``: the tokens that got a slot (after whether the deltas are still to be
        multiplied by their scores, as ``_run_modules``). A module that is not groupable runs on
        its kept tokens, as in exact routing."""
        order, ranked = self._runs[True], self._ranked(True, hidden.device)
        table = capacity.slots(flattened(runs).index_select(1, ranked), size)
        x = flattened(hidden).index_select(0, flattened(table.rows, 1)).view(len(members), size, -1)
        stack_ctx = ModuleContext(attention_mask, past)
        sizes = [len(indices) for indices in order]  # each run's [Mg, size, ...], split once
        inputs = zip(order, x.split(sizes), table.rows.split(sizes), strict=True)
        groups = {}  # by run: (members, x [Mg, size, H], where)
        for index, (indices, piece, slot_rows) in enumerate(inputs):
            group = [members[i] for i in indices]
            if group_key(group[0]) is not None:
                groups[index] = (
                    group,
                    piece,
                    GroupInput(hidden, stack_ctx, flattened(slot_rows, 1), size, fixed=True),
                )
        starts = [sum(sizes[:index]) * size for index in groups]
        attend_together(list(groups.values()), Slots(flattened(x), flattened(table.rows, 1), None), starts)
        outs, unused, offset = [], [], 0  # a run's first module's place in ``ranked``
        for index, indices in enumerate(order):
            first, offset = offset, offset + len(indices)
            if index in groups:
                outs.append(grouped_forward(*groups[index]))
                continue
            (i,) = indices  # not groupable: alone in its run, on its kept tokens (a host read)
            kept = table.kept[:, first].view(hidden.shape[:2])
            ctx = ModuleContext(attention_mask, past, kept, shared=stack_ctx.shared)
            if len(ctx.rows) == 0:
                unused.append(members[i])
                outs.append(TokenOutput(x.new_zeros(1, size, x.shape[-1]), x.new_zeros(1, size)))
                continue
            out = _at_tokens(members[i], ctx.pick(hidden), hidden, ctx)
            _record_extras(result, self.refs[i], out)
            # its kept tokens fill its first slots, in the same (ascending) order
            room = size - len(ctx.rows)
            outs.append(
                TokenOutput(F.pad(out.delta, (0, 0, 0, room))[None], F.pad(out.score, (0, room))[None])
            )
        # the attention pool refers back to the context: dropped, it goes with it, not by the cycle collector
        stack_ctx.shared.pop(POOL, None)
        if self.touch_unused and torch.is_grad_enabled():
            # FSDP (never compiled): a groupable module whose slots all stayed empty is idle too,
            # so drop_idle_gradients drops its zero gradient as under exact routing
            empty = (~table.filled.any(1)).tolist()
            skipped = {id(module) for module in unused}
            place = [m for indices in order for m in indices]
            unused += [members[m] for p, m in enumerate(place) if empty[p] and id(members[m]) not in skipped]
        deltas, gated = collected(outs)
        filled = flattened(table.filled, 1)
        rows = flattened(table.rows, 1)
        module = ranked.repeat_interleave(size)
        # where, not a product: an empty slot's output (its last token, never chosen) cannot turn
        # the sum into NaN even if it overflows
        delta = torch.where(filled[:, None], flattened(torch.cat(deltas)), 0.0)
        score = torch.where(filled, flattened(torch.cat([out.score for out in outs]), 1), 0.0)
        ran = torch.zeros_like(table.kept).index_copy(1, ranked, table.kept)
        return rows, module, delta, score, unused, gated, ran.view(*hidden.shape[:2], -1)

    def _routed_dense(self, result, attention_mask, past, top_index, top_weight, active) -> StackResult:
        """``_routed``'s hidden states and scores (no balance loss), from full forwards of every module."""
        hidden = result.hidden
        weight = top_weight.new_zeros(active.shape).scatter(-1, top_index, top_weight) * active
        on = torch.tensor([ref not in self.disabled for ref in self.refs], device=weight.device)
        weight = (weight * on).to(hidden.dtype)
        shared: dict = {}
        delta = torch.zeros_like(hidden)
        for m, (ref, module) in enumerate(zip(self.refs, self.members.values(), strict=True)):
            out = module(hidden, ModuleContext(attention_mask, past, shared=shared))
            delta = delta + (out.hidden - hidden) * weight[..., m : m + 1]
            _record(result, ref, out, out.score * active[..., m], active[..., m])
        result.hidden = hidden + delta
        return result


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, without an op when it is already."""
    return x if x.dtype == dtype else x.to(dtype)


def _placed(out: TokenOutput, hidden: torch.Tensor) -> ModuleOutput:
    """A token-wise output at every token as a module's ``forward`` gives it."""
    delta = out.delta.to(hidden.dtype).view_as(hidden)
    return ModuleOutput(hidden + delta, out.score.view(hidden.shape[:2]), out.losses, out.metrics)


def _at_tokens(
    module: DharmaModule, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext
) -> TokenOutput:
    """The module's output at ``x = ctx.pick(hidden)``: a token-wise module computes only there; others
    run on every token and are picked."""
    if computes_tokens(module):
        return module.forward_tokens(x, hidden, ctx)
    out = module(hidden, ctx)
    return TokenOutput(ctx.pick(out.hidden) - x, ctx.pick(out.score), out.losses, out.metrics)


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged forward; its gradient times ``factor`` backward."""
    if factor == 1.0:
        return x
    if factor == 0.0:
        return x.detach()
    if torch.compiler.is_compiling() or plain(x):
        return _ScaledGradient.apply(x, factor)
    return x.detach() + factor * (x - x.detach())  # forward-mode AD, torch.func, tensor subclasses


class _ScaledGradient(torch.autograd.Function):
    """One op each way (a view forward, a product backward), where ``x.detach() + factor * (x -
    x.detach())`` takes eight forward and a chain backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def real_tokens(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the real (not padding) tokens among ``hidden``'s ``T`` positions."""
    length = hidden.shape[1]
    if attention_mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return attention_mask[:, -length:].bool()


def _record(
    result: StackResult,
    ref: str,
    out: ModuleOutput | TokenOutput,
    score: torch.Tensor,
    active: torch.Tensor,
) -> None:
    """Keep a module's score ``[B, T]``, where it ran ``[B, T]``, and its named losses and metrics."""
    result.scores[ref] = score
    result.active[ref] = active
    _record_extras(result, ref, out)


def _record_extras(result: StackResult, ref: str, out: ModuleOutput | TokenOutput) -> None:
    """Keep a module's named losses and metrics."""
    for name, value in out.losses.items():
        result.losses[f"{ref}/{name}"] = value
    for name, value in out.metrics.items():
        result.metrics[f"{ref}/{name}"] = value


def _balance_loss(probs: torch.Tensor, picked: torch.Tensor, real: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer load balance: M * sum(fraction routed to m * mean router prob of m).
    ``picked [B, T, M]``: the router's top-k choices at real tokens (``real [B, T]``).

    Equals 1 when routing is uniform; grows as the router collapses onto few modules.
    """
    weight = real.to(probs.dtype)
    tokens = weight.sum().clamp_min(1.0)
    routed = picked.to(probs.dtype).sum((0, 1))  # tokens routed to each module: fraction * tokens * top_k
    summed = (probs * weight[..., None]).sum((0, 1))  # mean_prob * tokens
    # one product by a Python number (each is a few ops on the CPU: the number becomes a tensor)
    return (routed * summed).sum() / (tokens * tokens) * (probs.shape[-1] / top_k)
