"""Grouped execution: modules of one family and config at one insertion point, computed as one.

Every module keeps its own parameters (saved models keep their names); per forward the
group's weights are stacked ``[M, ...]`` and each block computes all the group's tokens,
padded to the group's largest share, with one batched product (``torch.bmm``), where
running modules one by one costs a chain of small ops per module.
The results equal the per-module path (``DharmaModule.forward_tokens``, the reference) to
float rounding.

A family opts in by defining ``grouped_tokens(members, x, groups)`` in the same class that
defines its computation (``forward_tokens``, ``delta``), on ``x [M, most, H]``; a plugin class that overrides
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
        sizes = torch.tensor(self.counts, device=device)
        module = torch.repeat_interleave(torch.arange(len(self.counts), device=device), sizes)
        first = torch.cumsum(sizes, 0) - sizes  # each module's first token in the concatenation
        # each token's row in the padded [M * most] layout
        self.slots = torch.arange(len(module), device=device) + (module * self.most - first[module])

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` module after module -> ``[M, most, ...]``, zeros after each module's tokens."""
        padded = x.new_zeros(len(self.counts) * self.most, *x.shape[1:]).index_copy(0, self.slots, x)
        return padded.view(len(self.counts), self.most, *x.shape[1:])

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`pad`."""
        return y.flatten(0, 1).index_select(0, self.slots)


def stacked(blocks: Sequence[nn.Module], name: str) -> torch.Tensor:
    """The parameter ``name`` of every block, stacked ``[M, ...]``."""
    return torch.stack([getattr(block, name) for block in blocks])


def along_tokens(blocks: Sequence[nn.Module], name: str) -> torch.Tensor:
    """``stacked`` with a token axis: ``[M, 1, ...]``, broadcast over a padded group's tokens."""
    return stacked(blocks, name).unsqueeze(1)


def linear(layers: Sequence[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """Each module's linear layer on its tokens ``x [M, most, in]``."""
    weight = stacked(layers, "weight").transpose(1, 2).to(x.dtype)
    if layers[0].bias is None:
        return torch.bmm(x, weight)
    return torch.baddbmm(along_tokens(layers, "bias").to(x.dtype), x, weight)


def layer_norm(norms: Sequence[nn.LayerNorm], x: torch.Tensor) -> torch.Tensor:
    first = norms[0]
    y = F.layer_norm(x, first.normalized_shape, eps=first.eps)
    return y * along_tokens(norms, "weight") + along_tokens(norms, "bias")


def adapter(blocks: Sequence[nn.Module], x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.BottleneckAdapter` of each module."""
    h = layer_norm([b.norm for b in blocks], x)
    if extra is not None:
        h = torch.cat([h, extra.to(h.dtype)], dim=-1)
    return linear([b.up for b in blocks], F.gelu(linear([b.down for b in blocks], h)))


def gated_residual(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.GatedResidual` of each module."""
    h = layer_norm([b.norm for b in blocks], x)
    value, gate = linear([b.value for b in blocks], h), linear([b.gate for b in blocks], h)
    return linear([b.out for b in blocks], value * torch.sigmoid(gate))


def memory(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """:class:`~dharma_kernel.blocks.MemoryAttention` of each module."""
    query = linear([b.query for b in blocks], layer_norm([b.norm for b in blocks], x))
    keys = stacked(blocks, "keys")  # [M, slots, key_dim]
    scores = torch.bmm(query, keys.transpose(1, 2).to(x.dtype)) / math.sqrt(keys.shape[-1])
    return torch.bmm(torch.softmax(scores, dim=-1), stacked(blocks, "values").to(x.dtype))


def detector(blocks: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`~dharma_kernel.blocks.ConceptDetector` of each module: ``(gate, intensity)``."""
    intensity = torch.sigmoid(linear([b.proj for b in blocks], layer_norm([b.norm for b in blocks], x)))
    if blocks[0].mix is None:
        return intensity[..., 0], intensity
    mix = torch.softmax(stacked(blocks, "mix"), dim=-1).unsqueeze(1)
    return (intensity * mix).sum(-1), intensity


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
        out = type(group[0]).grouped_tokens(group, groups.pad(x))
        delta, score = groups.unpad(out.delta), groups.unpad(out.score)
        parts = zip(delta.split(groups.counts), score.split(groups.counts), strict=True)
        for index, (delta, score) in zip(indices, parts, strict=True):
            outputs[index] = TokenOutput(delta, score)
    return outputs
