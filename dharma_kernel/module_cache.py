"""Past module inputs for cached generation, kept inside the backbone's KV cache.

Each stream is stored as one extra cache layer after the backbone's own, with the
hidden states ``[B, T, H]`` as keys ``[B, 1, T, H]`` and empty values. Living in
the same cache object means beam reordering, batch expansion and cropping apply to
module streams exactly as to the backbone's keys and values.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


def extend_stream(cache: Cache, index: int, hidden: torch.Tensor) -> torch.Tensor | None:
    """Append ``hidden`` to stream ``index``; return what it held before (``[B, P, H]``) or None."""
    layers = cache.layers
    while len(layers) <= index:
        layers.append(DynamicLayer())
    layer = layers[index]
    past = layer.keys[:, 0] if layer.is_initialized and layer.keys.numel() else None
    batch, length, _ = hidden.shape
    layer.update(hidden.detach().unsqueeze(1), hidden.new_empty(batch, 1, length, 0))
    return past


def peek_stream(cache: Cache, index: int) -> torch.Tensor | None:
    """What stream ``index`` holds (``[B, P, H]``), or None; nothing is appended."""
    layers = cache.layers
    if len(layers) <= index or not layers[index].is_initialized or not layers[index].keys.numel():
        return None
    return layers[index].keys[:, 0]
