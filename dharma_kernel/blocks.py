"""Building blocks that plugins compose. Each returns a residual delta or a gate.

Position-wise blocks (adapter, gated residual, memory, detector) work on any
``[..., H]`` input: a token-wise module calls them on just its tokens ``x``.
Given ``[B, T, H]`` and a ``ModuleContext`` whose ``active`` marks the tokens the
router sent to the module, they compute at those tokens only (zeros elsewhere: the
kernel discards them). Blocks that mix positions (attention, running summary) read
``ctx.past`` too, so cached generation sees exactly the sequence an uncached forward
sees; attention's ``at_tokens`` gives its output at the active tokens only. Output
projections start at zero, so a fresh module leaves a pretrained backbone unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cpu_linear import Linear
from .protocol import ModuleContext


def zero_init(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def with_past(hidden: torch.Tensor, ctx: ModuleContext | None) -> torch.Tensor:
    """``[B, P + T, H]``: the cached inputs followed by the current ones."""
    if ctx is None or ctx.past is None:
        return hidden
    return torch.cat([ctx.past.to(hidden.dtype), hidden], dim=1)


def per_token(
    fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, ctx: ModuleContext | None
) -> torch.Tensor:
    """``fn`` (position-wise, ``[..., H] -> [..., K]``) at the active tokens only; zeros elsewhere."""
    if ctx is None or ctx.rows is None:
        return fn(hidden)
    batch, length = hidden.shape[:2]
    return ctx.place(fn(ctx.pick(hidden)), batch, length)


class BottleneckAdapter(nn.Module):
    """LayerNorm, down-projection, GELU, up-projection: a position-wise residual delta."""

    def __init__(self, hidden_size: int, bottleneck: int, extra_inputs: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.down = Linear(hidden_size + extra_inputs, bottleneck)
        self.up = zero_init(Linear(bottleneck, hidden_size))

    def forward(
        self, hidden: torch.Tensor, ctx: ModuleContext | None = None, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``extra``: ``[..., extra_inputs]`` features joined to the normalised input (e.g. intensities)."""
        if ctx is not None and ctx.rows is not None:
            picked = self(ctx.pick(hidden), None, None if extra is None else ctx.pick(extra))
            return ctx.place(picked, *hidden.shape[:2])
        x = self.norm(hidden)
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], dim=-1)
        return self.up(F.gelu(self.down(x)))


class GatedResidual(nn.Module):
    """A gated linear unit: ``out(value(x) * sigmoid(gate(x)))``, channel-wise gating, residual delta."""

    def __init__(self, hidden_size: int, inner: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.value = Linear(hidden_size, inner)
        self.gate = Linear(hidden_size, inner)
        self.out = zero_init(Linear(inner, hidden_size))

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext | None = None) -> torch.Tensor:
        def glu(x: torch.Tensor) -> torch.Tensor:
            x = self.norm(x)
            return self.out(self.value(x) * torch.sigmoid(self.gate(x)))

        return per_token(glu, hidden, ctx)


class CausalAttention(nn.Module):
    """Multi-head causal self-attention over ``cat(past, hidden)``; returns a residual delta.

    ``kv_heads`` key/value heads are shared by groups of query heads (grouped-query
    attention): keys and values are computed at every position a query sees, so keeping
    them narrow keeps routed modules cheap. Queries are computed only at active tokens.
    Padding keys are masked; a query may always see itself, so no softmax row is empty.
    """

    def __init__(self, hidden_size: int, heads: int, head_dim: int, kv_heads: int | None = None) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm = nn.LayerNorm(hidden_size)
        self.query = Linear(hidden_size, heads * head_dim)
        self.key_value = Linear(hidden_size, 2 * kv_heads * head_dim)
        self.out = zero_init(Linear(heads * head_dim, hidden_size))

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext | None = None) -> torch.Tensor:
        ctx = ctx or ModuleContext()
        if ctx.rows is None:
            return self._every_token(hidden, ctx)
        return ctx.place(self.at_tokens(ctx.pick(hidden), hidden, ctx), *hidden.shape[:2])

    def at_tokens(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> torch.Tensor:
        """The delta ``[N, H]`` at the active tokens ``x = ctx.pick(hidden)`` (all of them if none marked).

        ``ctx.rows`` ascend, so each sequence's queries are consecutive: one attention call per
        sequence, over keys up to its last query (later keys are never attended).
        """
        if ctx.rows is None:
            return self._every_token(hidden, ctx).flatten(0, 1)
        full = with_past(hidden, ctx)
        length = hidden.shape[1]
        sequence, position = ctx.rows // length, ctx.rows % length + (full.shape[1] - length)
        queries, seen, prefixes = _prefixes(sequence, position, *full.shape[:2])
        k, v = self._keys_values(self.norm(full.flatten(0, 1).index_select(0, prefixes))[None])
        q = self.query(self.norm(x)).view(-1, self.heads, self.head_dim)
        real = ctx.key_mask(length)  # [B, P + T]
        parts = zip(
            q.split(queries), position.split(queries), k.split(seen, 2), v.split(seen, 2), strict=True
        )
        outputs = []
        for b, (q_b, at, k_b, v_b) in enumerate(parts):
            if queries[b]:
                allowed = allowed_keys(at[:, None], None if real is None else real[b, : seen[b]], seen[b])
                outputs.append(attend(q_b.transpose(0, 1)[None], k_b, v_b, allowed)[0].transpose(0, 1))
        return self.out(torch.cat(outputs).reshape(-1, self.heads * self.head_dim))

    def _every_token(self, hidden: torch.Tensor, ctx: ModuleContext) -> torch.Tensor:
        batch, length, _ = hidden.shape
        normed = self.norm(with_past(hidden, ctx))  # [B, P + T, H]
        total = normed.shape[1]
        k, v = self._keys_values(normed)
        q = self.query(normed[:, total - length :] if total > length else normed)
        q = q.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        keys = ctx.key_mask(length)  # [B, P + T]
        position = torch.arange(length, device=hidden.device)[:, None] + (total - length)  # [T, 1]
        allowed = allowed_keys(position, None if keys is None else keys[:, None, :], total)
        y = attend(q, k, v, allowed if keys is None else allowed[:, None])
        return self.out(y.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))

    def _keys_values(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, kv_heads, S, D]`` keys and values of ``normed [B, S, H]``."""
        batch, positions, _ = normed.shape
        k, v = self.key_value(normed).chunk(2, dim=-1)
        return tuple(t.view(batch, positions, self.kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))


def _prefixes(
    sequence: torch.Tensor, position: torch.Tensor, batch: int, total: int
) -> tuple[list[int], list[int], torch.Tensor]:
    """For queries at (``sequence``, ``position``): per sequence, how many queries it has and how
    many positions they see (through its last query; none without queries), and those positions
    as rows of the flattened ``[B, total]``."""
    queries = torch.bincount(sequence, minlength=batch).tolist()
    last = position.new_full((batch,), -1).scatter_reduce(0, sequence, position, "amax")
    rows = (torch.arange(total, device=position.device) <= last[:, None]).flatten().nonzero().squeeze(1)
    return queries, (last + 1).tolist(), rows


# cuDNN attention builds a plan per new shape (measured on an H200: ~30 ms forward, ~48 ms backward
# each), and routed modules attend with a new query/key count per sequence almost every call.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``[B, heads, Q, D]`` queries over ``[B, kv_heads, K, D]`` keys; query head groups share a key head."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    with sdpa_kernel(_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


def allowed_keys(position: torch.Tensor, keys: torch.Tensor | None, total: int) -> torch.Tensor:
    """Which keys each query row may see: causal, real tokens, and always itself.

    ``position``: ``[Q, 1]`` absolute positions of the queries; ``keys``: real-token mask
    broadcastable against ``[Q, total]``, or None for no padding.
    """
    columns = torch.arange(total, device=position.device)
    allowed = columns <= position
    if keys is None:
        return allowed
    return (allowed & keys) | (columns == position)


class MultiViewAttention(nn.Module):
    """Several independent causal attention views, mixed per token by a learned softmax."""

    # Grouped code reads every view's weights at once (grouped.multi_view): training holds each
    # of their parameters as one stacked tensor, view after view (dharma_kernel.train.stacked).
    read_together: ClassVar[tuple[str, ...]] = ("views",)

    def __init__(self, hidden_size: int, views: int, heads: int, head_dim: int, kv_heads: int) -> None:
        super().__init__()
        self.views = nn.ModuleList(
            CausalAttention(hidden_size, heads, head_dim, kv_heads) for _ in range(views)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.mix = Linear(hidden_size, views)

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext | None = None) -> torch.Tensor:
        ctx = ctx or ModuleContext()
        return ctx.place(self.at_tokens(ctx.pick(hidden), hidden, ctx), *hidden.shape[:2])

    def at_tokens(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> torch.Tensor:
        """The delta ``[N, H]`` at the active tokens ``x = ctx.pick(hidden)`` (all of them if none marked)."""
        weights = torch.softmax(self.mix(self.norm(x)), dim=-1)  # [N, V]
        outputs = torch.stack([view.at_tokens(x, hidden, ctx) for view in self.views], dim=-1)  # [N, H, V]
        return (outputs * weights[:, None, :]).sum(-1)


class MemoryAttention(nn.Module):
    """Attention from each token to ``slots`` learned memory entries (patterns the module keeps).

    Position-wise: a token reads the memory, never other tokens, so it is causal by construction.
    """

    def __init__(self, hidden_size: int, slots: int, key_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.query = Linear(hidden_size, key_dim)
        self.keys = nn.Parameter(torch.randn(slots, key_dim) / math.sqrt(key_dim))
        self.values = nn.Parameter(torch.zeros(slots, hidden_size))

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext | None = None) -> torch.Tensor:
        def read(x: torch.Tensor) -> torch.Tensor:
            scores = self.query(self.norm(x)) @ self.keys.T / math.sqrt(self.keys.shape[1])
            return torch.softmax(scores, dim=-1) @ self.values

        return per_token(read, hidden, ctx)


class ConceptDetector(nn.Module):
    """``detectors`` learned per-token concept detectors and their gate in [0, 1].

    Returns ``(gate [B, T], intensity [B, T, detectors])``. The gate is a learned
    convex mix of the intensities (a single detector is its own gate).
    """

    def __init__(self, hidden_size: int, detectors: int = 1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = Linear(hidden_size, detectors)
        # With one detector a softmax mix is constant and would never get a gradient.
        self.mix = nn.Parameter(torch.zeros(detectors)) if detectors > 1 else None

    def forward(
        self, hidden: torch.Tensor, ctx: ModuleContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        intensity = per_token(lambda x: torch.sigmoid(self.proj(self.norm(x))), hidden, ctx)
        if self.mix is None:
            return intensity[..., 0], intensity
        return (intensity * torch.softmax(self.mix, dim=0)).sum(-1), intensity


class RunningSummary(nn.Module):
    """Causal running mean of the real (non-padding) tokens: position t sees positions <= t.

    Never a whole-sequence mean, which would leak the future into the past. No
    parameters: a module projects the summary itself. Modules of one stack share it
    through ``ctx.shared``.
    """

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext | None = None) -> torch.Tensor:
        if ctx is None:
            return _running_mean(hidden, None)
        kept = ctx.shared.get("running_summary")
        if kept is None or kept[0] is not hidden:
            kept = ctx.shared["running_summary"] = (hidden, _running_mean(hidden, ctx))
        return kept[1]


def _running_mean(hidden: torch.Tensor, ctx: ModuleContext | None) -> torch.Tensor:
    length = hidden.shape[1]
    full = with_past(hidden, ctx).float()
    keys = ctx.key_mask(length) if ctx is not None else None
    if keys is None:  # every position counts: position t has t + 1
        count = torch.arange(1, full.shape[1] + 1, device=full.device, dtype=full.dtype)[:, None]
        return (torch.cumsum(full, dim=1) / count)[:, -length:].to(hidden.dtype)
    weight = keys[..., None].float()
    total = torch.cumsum(full * weight, dim=1)
    count = torch.cumsum(weight, dim=1).clamp_min(1.0)
    return (total / count)[:, -length:].to(hidden.dtype)
