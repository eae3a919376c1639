"""Building blocks that plugins compose. Each returns a residual delta or a gate.

Every block takes the module's ``ModuleContext``. Under routed composition
``ctx.active`` marks the tokens the router sent to the module, and blocks compute
at those tokens only (zeros elsewhere: the kernel discards them). Blocks that mix
positions (attention, running summary) read ``ctx.past`` too, so cached
generation sees exactly the sequence an uncached forward sees. Output
projections start at zero, so a fresh module leaves a pretrained backbone unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .protocol import ModuleContext

# Below this share of active tokens, gathering them beats computing every token.
SPARSE_BELOW = 0.5


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


def sparse_positions(ctx: ModuleContext | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(batch, time)`` indices of the active tokens when few enough are active to gather them."""
    if ctx is None or ctx.active is None or ctx.active.float().mean() >= SPARSE_BELOW:
        return None
    return ctx.active.nonzero(as_tuple=True)


def per_token(
    fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, ctx: ModuleContext | None
) -> torch.Tensor:
    """``fn`` (position-wise, ``[..., H] -> [..., K]``) at the active tokens only; zeros elsewhere."""
    index = sparse_positions(ctx)
    if index is None:
        return fn(hidden)
    picked = fn(hidden[index])
    out = picked.new_zeros(*hidden.shape[:2], *picked.shape[1:])
    out[index] = picked
    return out


class BottleneckAdapter(nn.Module):
    """LayerNorm, down-projection, GELU, up-projection: a position-wise residual delta."""

    def __init__(self, hidden_size: int, bottleneck: int, extra_inputs: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size + extra_inputs, bottleneck)
        self.up = zero_init(nn.Linear(bottleneck, hidden_size))

    def forward(
        self, hidden: torch.Tensor, ctx: ModuleContext | None = None, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``extra``: ``[B, T, extra_inputs]`` features joined to the normalised input (e.g. intensities)."""
        joined = hidden if extra is None else torch.cat([hidden, extra.to(hidden.dtype)], dim=-1)
        width = hidden.shape[-1]
        return per_token(lambda x: self.up(F.gelu(self.down(self._norm(x, width)))), joined, ctx)

    def _norm(self, x: torch.Tensor, width: int) -> torch.Tensor:
        if x.shape[-1] == width:
            return self.norm(x)
        return torch.cat([self.norm(x[..., :width]), x[..., width:]], dim=-1)


class GatedResidual(nn.Module):
    """A gated linear unit: ``out(value(x) * sigmoid(gate(x)))``, channel-wise gating, residual delta."""

    def __init__(self, hidden_size: int, inner: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.value = nn.Linear(hidden_size, inner)
        self.gate = nn.Linear(hidden_size, inner)
        self.out = zero_init(nn.Linear(inner, hidden_size))

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext | None = None) -> torch.Tensor:
        def glu(x: torch.Tensor) -> torch.Tensor:
            x = self.norm(x)
            return self.out(self.value(x) * torch.sigmoid(self.gate(x)))

        return per_token(glu, hidden, ctx)


class CausalAttention(nn.Module):
    """Multi-head causal self-attention over ``cat(past, hidden)``; returns a residual delta.

    ``kv_heads`` key/value heads are shared by groups of query heads (grouped-query
    attention): keys and values are computed at every position, so keeping them
    narrow keeps routed modules cheap. Queries are computed only at active tokens.
    Padding keys are masked; a query may always see itself, so no softmax row is empty.
    """

    def __init__(self, hidden_size: int, heads: int, head_dim: int, kv_heads: int | None = None) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm = nn.LayerNorm(hidden_size)
        self.query = nn.Linear(hidden_size, heads * head_dim)
        self.key_value = nn.Linear(hidden_size, 2 * kv_heads * head_dim)
        self.out = zero_init(nn.Linear(heads * head_dim, hidden_size))

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext | None = None) -> torch.Tensor:
        ctx = ctx or ModuleContext()
        batch, length, _ = hidden.shape
        full = with_past(hidden, ctx)
        total = full.shape[1]
        k, v = self.key_value(self.norm(full)).chunk(2, dim=-1)
        k, v = (t.view(batch, total, self.kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))
        groups = self.heads // self.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        keys = ctx.key_mask(length)  # [B, P + T]
        offset = total - length
        index = sparse_positions(ctx)
        if index is None:
            position = torch.arange(length, device=hidden.device)[:, None] + offset  # [T, 1]
            allowed = _allowed(position, None if keys is None else keys[:, None, :], total)
            y = self._attend(hidden, k, v, allowed if keys is None else allowed[:, None])
            return self.out(y)
        rows, at = index  # one query per active token, against its own sequence's keys
        allowed = _allowed((at + offset)[:, None], None if keys is None else keys[rows], total)
        y = self._attend(hidden[index][:, None], k[rows], v[rows], allowed[:, None, None, :])
        out = hidden.new_zeros(batch, length, hidden.shape[-1])
        out[index] = self.out(y[:, 0])
        return out

    def _attend(
        self, queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        q = self.query(self.norm(queries))
        q = q.view(q.shape[0], q.shape[1], self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.heads * self.head_dim)


def _allowed(position: torch.Tensor, keys: torch.Tensor | None, total: int) -> torch.Tensor:
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

    def __init__(self, hidden_size: int, views: int, heads: int, head_dim: int, kv_heads: int) -> None:
        super().__init__()
        self.views = nn.ModuleList(
            CausalAttention(hidden_size, heads, head_dim, kv_heads) for _ in range(views)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.mix = nn.Linear(hidden_size, views)

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext | None = None) -> torch.Tensor:
        weights = per_token(lambda x: torch.softmax(self.mix(self.norm(x)), dim=-1), hidden, ctx)
        outputs = torch.stack([view(hidden, ctx) for view in self.views], dim=-1)  # [B, T, H, V]
        return (outputs * weights[..., None, :]).sum(-1)


class MemoryAttention(nn.Module):
    """Attention from each token to ``slots`` learned memory entries (patterns the module keeps).

    Position-wise: a token reads the memory, never other tokens, so it is causal by construction.
    """

    def __init__(self, hidden_size: int, slots: int, key_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.query = nn.Linear(hidden_size, key_dim)
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
        self.proj = nn.Linear(hidden_size, detectors)
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
    parameters: a module projects the summary itself.
    """

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext | None = None) -> torch.Tensor:
        length = hidden.shape[1]
        full = with_past(hidden, ctx).float()
        keys = ctx.key_mask(length) if ctx is not None else None
        weight = torch.ones_like(full[..., :1]) if keys is None else keys[..., None].float()
        total = torch.cumsum(full * weight, dim=1)
        count = torch.cumsum(weight, dim=1).clamp_min(1.0)
        return (total / count)[:, -length:].to(hidden.dtype)
