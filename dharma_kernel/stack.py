"""A stack of modules at one insertion point, composed sequential, parallel or routed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache

from .module_cache import extend_stream
from .protocol import DharmaModule, ModuleContext, ModuleOutput

COMPOSITIONS = ("sequential", "parallel", "routed")


def module_key(ref: str) -> str:
    """``darshanas.vedanta`` -> ``darshanas__vedanta`` (module names cannot hold dots)."""
    return ref.replace(".", "__")


@dataclass
class StackResult:
    """New hidden states, and per module its score ``[B, T]`` and where it ran ``[B, T]``."""

    hidden: torch.Tensor
    scores: dict[str, torch.Tensor]
    active: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class ModuleStack(nn.Module):
    """Modules applied residually after one transformer block.

    sequential: each module rewrites the output of the previous one.
    parallel: every module reads the same input; their deltas are averaged.
    routed: a per-token router picks ``top_k`` modules, only those run, and their
    deltas are mixed by the renormalised router weights.
    """

    def __init__(self, modules: list[DharmaModule], composition: str, top_k: int, hidden_size: int) -> None:
        super().__init__()
        if composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {COMPOSITIONS}, got {composition!r}")
        self.refs = [m.ref() for m in modules]
        self.composition = composition
        self.top_k = top_k
        self.members = nn.ModuleDict({module_key(m.ref()): m for m in modules})
        self.router = nn.Linear(hidden_size, len(modules), bias=False) if composition == "routed" else None
        self.stream_base = 0  # first cache stream index; set by the model
        self.gradient_checkpointing = False

    @property
    def streams(self) -> int:
        """Cache streams needed: one per module input when sequential, else one shared input."""
        return len(self.refs) if self.composition == "sequential" else 1

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None = None
    ) -> StackResult:
        if self.composition == "sequential":
            return self._sequential(hidden, attention_mask, cache)
        past = self._past(cache, 0, hidden)
        if self.composition == "parallel":
            return self._parallel(hidden, ModuleContext(attention_mask, past))
        return self._routed(hidden, attention_mask, past)

    def _past(self, cache: Cache | None, offset: int, hidden: torch.Tensor) -> torch.Tensor | None:
        return None if cache is None else extend_stream(cache, self.stream_base + offset, hidden)

    def _sequential(self, hidden, attention_mask, cache) -> StackResult:
        result = StackResult(hidden, {}, {})
        for offset, (ref, module) in enumerate(zip(self.refs, self.members.values(), strict=True)):
            ctx = ModuleContext(attention_mask, self._past(cache, offset, result.hidden))
            out = module(result.hidden, ctx)
            result.hidden = out.hidden
            _record(result, ref, out, None)
        return result

    def _parallel(self, hidden, ctx) -> StackResult:
        result = StackResult(hidden, {}, {})
        delta = torch.zeros_like(hidden)
        for ref, module in zip(self.refs, self.members.values(), strict=True):
            out = module(hidden, ctx)
            delta = delta + (out.hidden - hidden)
            _record(result, ref, out, None)
        result.hidden = hidden + delta / len(self.refs)
        return result

    def _routed(self, hidden, attention_mask, past) -> StackResult:
        result = StackResult(hidden, {}, {})
        probs = torch.softmax(self.router(hidden).float(), dim=-1)  # [B, T, M]
        top_weight, top_index = probs.topk(self.top_k, dim=-1)
        top_weight = top_weight / top_weight.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, top_index, top_weight)
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_index, True)
        real = _real_tokens(attention_mask, hidden)
        delta = torch.zeros_like(hidden)
        for index, (ref, module) in enumerate(zip(self.refs, self.members.values(), strict=True)):
            active = chosen[..., index] & real
            if not bool(active.any()):
                result.scores[ref] = hidden.new_zeros(hidden.shape[:2])
                result.active[ref] = active
                continue
            out = module(hidden, ModuleContext(attention_mask, past, active))
            weight = weights[..., index : index + 1].to(hidden.dtype)
            delta = delta + weight * (out.hidden - hidden)
            # a score only where the module ran: per token, whatever else is in the batch
            out.score = out.score * active.to(out.score.dtype)
            _record(result, ref, out, active)
        result.hidden = hidden + delta
        result.losses["router_balance"] = _balance_loss(probs, chosen, real, self.top_k)
        return result


def _real_tokens(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    length = hidden.shape[1]
    if attention_mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return attention_mask[:, -length:].bool()


def _record(result: StackResult, ref: str, out: ModuleOutput, active: torch.Tensor | None) -> None:
    result.scores[ref] = out.score
    result.active[ref] = active if active is not None else torch.ones_like(out.score, dtype=torch.bool)
    for name, value in out.losses.items():
        result.losses[f"{ref}/{name}"] = value
    for name, value in out.metrics.items():
        result.metrics[f"{ref}/{name}"] = value


def _balance_loss(probs: torch.Tensor, chosen: torch.Tensor, real: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer load balance: M * sum(fraction routed to m * mean router prob of m).

    Equals 1 when routing is uniform; grows as the router collapses onto few modules.
    """
    weight = real[..., None].to(probs.dtype)
    tokens = weight.sum().clamp_min(1.0)
    fraction = (chosen.to(probs.dtype) * weight).sum((0, 1)) / (tokens * top_k)
    mean_prob = (probs * weight).sum((0, 1)) / tokens
    return probs.shape[-1] * (fraction * mean_prob).sum()
