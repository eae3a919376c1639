"""Fixed-capacity routing: every routed module computes exactly ``capacity`` token slots.

Exact routing (the default) gives each module the tokens that chose it, so the shapes change
every step and the host must read the counts back (``nonzero``, ``tolist``): on a GPU each
read waits for the device, and under ``torch.compile`` each is a graph break. With
``[modules] capacity_factor`` set, a training step lays the chosen (module, token) pairs out in
a fixed ``[M, capacity]`` table instead, as mixture-of-experts layers do:

- ``capacity = ceil(capacity_factor * top_k * tokens / M)`` (at most ``tokens``): the slots of
  a module if the router spread the tokens evenly, times the factor;
- a module keeps the first ``capacity`` tokens that chose it (in token order); a token past
  that gets nothing from that module (its other choices still apply, weighted as before);
- slots no token filled point at a real token and are weighted zero.

Every shape then depends on the batch shape only. Evaluation and generation route exactly
(``dharma generate --compile`` uses slots with room for every token, the same result:
:mod:`dharma_kernel.decoding`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def capacity(tokens: int, modules: int, top_k: int, factor: float) -> int:
    """The slots per module for ``tokens`` tokens each choosing ``top_k`` of ``modules``."""
    return max(1, min(tokens, math.ceil(factor * top_k * tokens / modules)))


@dataclass
class Slots:
    """The ``[M, C]`` slot table of one routed forward, modules in the order of the runs.

    rows: each slot's token (a row of ``hidden.flatten(0, 1)``); an empty slot holds the last
    token (a real row, so every gather stays in range; its output is weighted zero).
    filled: ``[M, C]`` bool, the slots a token filled (the first ones of each module).
    kept: ``[N, M]`` bool, the (token, module) pairs that got a slot.
    """

    rows: torch.Tensor
    filled: torch.Tensor
    kept: torch.Tensor


def slots(runs: torch.Tensor, size: int) -> Slots:
    """The slot table for ``runs [N, M]`` (bool: the token chose the module) with ``size`` slots
    per module: fixed shapes, nothing read back to the host."""
    tokens, modules = runs.shape
    place = torch.cumsum(runs.long(), 0) - 1  # [N, M]: the token's place among its module's tokens
    kept = runs & (place < size)
    first_slot = torch.arange(modules, device=runs.device) * size
    trash = modules * size  # every pair without a slot writes here; the row is dropped
    target = torch.where(kept, first_slot + place, trash).flatten()
    token = torch.arange(tokens, device=runs.device).repeat_interleave(modules)
    table = torch.full((trash + 1,), tokens, dtype=torch.long, device=runs.device)  # `tokens`: empty
    table = table.index_put((target,), token)[:trash].view(modules, size)  # kept pairs: distinct slots
    filled = table < tokens
    return Slots(table.clamp(max=tokens - 1), filled, kept)
