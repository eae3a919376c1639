"""Grouped execution: modules of one family and config at one insertion point, computed as one.

Every module keeps its own parameters (saved models keep their names); per forward the
group's weights are stacked ``[M, ...]`` and each block computes all the group's tokens,
sorted module after module, with one grouped product (``torch._grouped_mm`` over the
token offsets), where running modules one by one costs a chain of small ops per module.
The results equal the per-module path (``DharmaModule.forward_tokens``, the reference) to
float rounding.

A family opts in by defining ``grouped_tokens(members, x, groups)`` in the same class that
defines its computation (``forward_tokens``, ``delta``); a plugin class that overrides
either without its own ``grouped_tokens`` runs alone, as before (see :func:`group_key`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .protocol import DharmaModule, TokenOutput

# What a module's own computation is defined by: the first class in its MRO that defines one.
_COMPUTATION = ("forward", "forward_tokens", "delta", "grouped_tokens")
# torch._grouped_mm wants 16-byte aligned strides: inner sizes are padded to this many floats.
_ALIGN = 4


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
    """The tokens of ``len(counts)`` modules, concatenated module after module (``counts`` each)."""

    def __init__(self, counts: Sequence[int], device: torch.device) -> None:
        self.counts = list(counts)
        sizes = torch.tensor(self.counts, device=device)
        self.offsets = torch.cumsum(sizes, 0).to(torch.int32)
        self.ids = torch.repeat_interleave(torch.arange(len(self.counts), device=device), sizes)

    def per_token(self, stacked: torch.Tensor) -> torch.Tensor:
        """``[M, ...]`` one value per module -> ``[N, ...]`` each token its module's."""
        return stacked.index_select(0, self.ids)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x [N, K]`` times each token's module's ``weight [M, K, O]``: ``[N, O]``."""
        inner, out = weight.shape[1:]
        weight = weight.to(x.dtype)
        if inner % _ALIGN:  # zero rows and columns add nothing
            x = F.pad(x, (0, _ALIGN - inner % _ALIGN))
            weight = F.pad(weight, (0, 0, 0, _ALIGN - inner % _ALIGN))
        if out % _ALIGN:
            weight = F.pad(weight, (0, _ALIGN - out % _ALIGN))
        y = torch._grouped_mm(x.contiguous(), weight.contiguous(), offs=self.offsets)
        return y[:, :out] if out % _ALIGN else y


def stacked(blocks: Sequence[nn.Module], name: str) -> torch.Tensor:
    """The parameter ``name`` of every block, stacked ``[M, ...]``."""
    return torch.stack([getattr(block, name) for block in blocks])


def linear(layers: Sequence[nn.Linear], x: torch.Tensor, groups: Groups) -> torch.Tensor:
    y = groups.matmul(x, stacked(layers, "weight").transpose(1, 2))
    if layers[0].bias is None:
        return y
    return y + groups.per_token(stacked(layers, "bias")).to(y.dtype)


def layer_norm(norms: Sequence[nn.LayerNorm], x: torch.Tensor, groups: Groups) -> torch.Tensor:
    first = norms[0]
    y = F.layer_norm(x, first.normalized_shape, eps=first.eps)
    return y * groups.per_token(stacked(norms, "weight")) + groups.per_token(stacked(norms, "bias"))


def adapter(blocks: Sequence[nn.Module], x: torch.Tensor, groups: Groups, extra=None) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.BottleneckAdapter` of each token's module."""
    h = layer_norm([b.norm for b in blocks], x, groups)
    if extra is not None:
        h = torch.cat([h, extra.to(h.dtype)], dim=-1)
    h = F.gelu(linear([b.down for b in blocks], h, groups))
    return linear([b.up for b in blocks], h, groups)


def gated_residual(blocks: Sequence[nn.Module], x: torch.Tensor, groups: Groups) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.GatedResidual` of each token's module."""
    h = layer_norm([b.norm for b in blocks], x, groups)
    value = linear([b.value for b in blocks], h, groups)
    gate = linear([b.gate for b in blocks], h, groups)
    return linear([b.out for b in blocks], value * torch.sigmoid(gate), groups)


def memory(blocks: Sequence[nn.Module], x: torch.Tensor, groups: Groups) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.MemoryAttention` of each token's module."""
    query = linear([b.query for b in blocks], layer_norm([b.norm for b in blocks], x, groups), groups)
    keys = stacked(blocks, "keys")  # [M, slots, key_dim]
    scores = groups.matmul(query, keys.transpose(1, 2)) / math.sqrt(keys.shape[-1])
    return groups.matmul(torch.softmax(scores, dim=-1), stacked(blocks, "values"))


def detector(
    blocks: Sequence[nn.Module], x: torch.Tensor, groups: Groups
) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`~dharma_kernel.blocks.ConceptDetector` of each token's module: ``(gate, intensity)``."""
    h = layer_norm([b.norm for b in blocks], x, groups)
    intensity = torch.sigmoid(linear([b.proj for b in blocks], h, groups))
    if blocks[0].mix is None:
        return intensity[..., 0], intensity
    mix = torch.softmax(stacked(blocks, "mix"), dim=-1)
    return (intensity * groups.per_token(mix)).sum(-1), intensity


def run_groups(members: Sequence[DharmaModule], tokens: Sequence[torch.Tensor]) -> dict[int, TokenOutput]:
    """The output of each groupable module (by index) at its ``tokens``, computed group by group.

    Modules without tokens, and groups of one, are left out: they run alone (the reference path).
    """
    keyed: dict[tuple, list[int]] = {}
    for index, (module, x) in enumerate(zip(members, tokens, strict=True)):
        key = group_key(module) if len(x) else None
        if key is not None:
            keyed.setdefault(key, []).append(index)
    outputs: dict[int, TokenOutput] = {}
    for indices in keyed.values():
        if len(indices) < 2:
            continue
        group = [members[i] for i in indices]
        x = torch.cat([tokens[i] for i in indices])
        groups = Groups([len(tokens[i]) for i in indices], x.device)
        out = type(group[0]).grouped_tokens(group, x, groups)
        parts = zip(out.delta.split(groups.counts), out.score.split(groups.counts), strict=True)
        for index, (delta, score) in zip(indices, parts, strict=True):
            outputs[index] = TokenOutput(delta, score)
    return outputs
