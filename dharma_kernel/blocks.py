"""Building blocks that plugins compose. Each returns a residual delta or a gate.

Blocks that mix information across positions (attention, running summary) read
the module's input together with ``ctx.past`` so that cached generation sees
exactly the sequence an uncached forward sees. Output projections start at
zero, so a freshly assembled module leaves a pretrained backbone unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .protocol import ModuleContext


def zero_init(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def with_past(hidden: torch.Tensor, ctx: ModuleContext) -> torch.Tensor:
    """``[B, P + T, H]``: the cached inputs followed by the current ones."""
    return hidden if ctx.past is None else torch.cat([ctx.past.to(hidden.dtype), hidden], dim=1)


class BottleneckAdapter(nn.Module):
    """LayerNorm, down-projection, GELU, up-projection: a position-wise residual delta."""

    def __init__(self, hidden_size: int, bottleneck: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = zero_init(nn.Linear(bottleneck, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(self.norm(hidden))))


class CausalAttention(nn.Module):
    """Multi-head causal self-attention over ``cat(past, hidden)``; returns a residual delta.

    Queries come from the current positions only; keys and values from cached and
    current ones. Padding keys are masked; every query may always see itself, so a
    padding row never becomes an all-masked softmax (its output is discarded anyway).
    """

    def __init__(self, hidden_size: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm = nn.LayerNorm(hidden_size)
        self.query = nn.Linear(hidden_size, inner)
        self.key_value = nn.Linear(hidden_size, 2 * inner)
        self.out = zero_init(nn.Linear(inner, hidden_size))

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext) -> torch.Tensor:
        batch, length, _ = hidden.shape
        full = with_past(hidden, ctx)
        total = full.shape[1]
        q = self.query(self.norm(hidden))
        k, v = self.key_value(self.norm(full)).chunk(2, dim=-1)
        q, k, v = (t.view(batch, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        allowed = causal_mask(length, total, hidden.device)
        keys = ctx.key_mask(length)
        if keys is not None:
            allowed = allowed & keys[:, None, None, :]
            allowed = allowed | _self_positions(length, total, hidden.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))


def causal_mask(length: int, total: int, device: torch.device) -> torch.Tensor:
    """``[T, P + T]`` bool: query ``i`` (at absolute position ``P + i``) may see keys ``<= P + i``."""
    offset = total - length
    rows = torch.arange(length, device=device)[:, None] + offset
    return torch.arange(total, device=device)[None, :] <= rows


def _self_positions(length: int, total: int, device: torch.device) -> torch.Tensor:
    offset = total - length
    rows = torch.arange(length, device=device)[:, None] + offset
    return torch.arange(total, device=device)[None, :] == rows


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

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        intensity = torch.sigmoid(self.proj(self.norm(hidden)))
        if self.mix is None:
            return intensity[..., 0], intensity
        return (intensity * torch.softmax(self.mix, dim=0)).sum(-1), intensity


class RunningSummary(nn.Module):
    """Causal running mean of the real (non-padding) tokens: position t sees positions <= t.

    Never a whole-sequence mean, which would leak the future into the past. No
    parameters: a module projects the summary itself.
    """

    def forward(self, hidden: torch.Tensor, ctx: ModuleContext) -> torch.Tensor:
        length = hidden.shape[1]
        full = with_past(hidden, ctx).float()
        keys = ctx.key_mask(length)
        weight = torch.ones_like(full[..., :1]) if keys is None else keys[..., None].float()
        total = torch.cumsum(full * weight, dim=1)
        count = torch.cumsum(weight, dim=1).clamp_min(1.0)
        return (total / count)[:, -length:].to(hidden.dtype)
