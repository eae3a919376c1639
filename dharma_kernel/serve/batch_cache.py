"""One DynamicCache holding several sequences of different lengths, left-padded.

Every cache layer, the backbone's keys and values and the module streams alike
(:mod:`dharma_kernel.module_cache`), keeps its positions in dim 2, so one rule pads, joins,
selects and trims them all. The attention mask marks the padding; position ids count only
real tokens. Padding sits at the left, so every sequence's last position is real (the routed
stacks' concept evidence continues from there).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def cache_length(cache: DynamicCache) -> int:
    layer = cache.layers[0] if cache.layers else None
    return 0 if layer is None or not layer.is_initialized else layer.keys.shape[2]


def _pad_left(tensor: torch.Tensor, extra: int) -> torch.Tensor:
    if extra == 0:
        return tensor
    shape = list(tensor.shape)
    shape[2] = extra
    return torch.cat([tensor.new_zeros(shape), tensor], dim=2)


def join(caches: list[DynamicCache]) -> DynamicCache:
    """The caches side by side in one (batch order kept), each left-padded to the longest."""
    length = max(cache_length(cache) for cache in caches)
    joined = DynamicCache()
    joined.layers = []
    for index in range(len(caches[0].layers)):
        layer = DynamicLayer()
        parts = [c.layers[index] for c in caches]
        layer.lazy_initialization(parts[0].keys, parts[0].values)
        layer.keys = torch.cat([_pad_left(p.keys, length - p.keys.shape[2]) for p in parts])
        layer.values = torch.cat([_pad_left(p.values, length - p.values.shape[2]) for p in parts])
        joined.layers.append(layer)
    return joined


def select(cache: DynamicCache, rows: list[int], drop_front: int) -> None:
    """Keep batch ``rows`` and drop the first ``drop_front`` positions (padding in every kept row)."""
    index = torch.tensor(rows, dtype=torch.long)
    for layer in cache.layers:
        layer.keys = layer.keys[index, :, drop_front:]
        layer.values = layer.values[index, :, drop_front:]
