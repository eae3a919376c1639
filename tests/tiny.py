"""A tiny assembled model for tests: GPT-2 with both bundled plugins."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dharma_kernel.testing import perturb, tiny_backbone_config


def tiny_layout(composition: str = "sequential", top_k: int = 1, at_layers=(0, 1), **extra) -> dict:
    from dharma_plugin_dharma import Dharma
    from dharma_plugin_vedanta import Vedanta

    modules = [
        {"ref": "paths.dharma", "config": Dharma.make_config("tiny").model_dump()},
        {"ref": "darshanas.vedanta", "config": Vedanta.make_config("tiny").model_dump()},
    ]
    return {
        "at_layers": list(at_layers),
        "composition": composition,
        "top_k": top_k,
        "modules": modules,
        **extra,
    }


def tiny_model(composition: str = "sequential", top_k: int = 1, trained: bool = True, **kwargs):
    """A 2-layer GPT-2 with both bundled plugins at both layers; module weights randomised."""
    from dharma_kernel.assemble import build_model

    model = build_model(tiny_backbone_config(), tiny_layout(composition, top_k, **kwargs), seed=0)
    if trained:
        perturb(model.stacks, seed=1, std=0.1)
    return model.eval()


@contextmanager
def recorded_hits(model) -> Iterator[list[torch.Tensor]]:
    """Within the block, every routed stack's per-token router scores (``ModuleStack._hits``), in order."""
    hits: list[torch.Tensor] = []
    originals = {}
    for stack in model.stacks.values():
        originals[stack] = stack._hits

        def record(hidden, input_ids, _original=stack._hits):
            out = _original(hidden, input_ids)
            hits.append(out.detach())
            return out

        stack._hits = record
    try:
        yield hits
    finally:
        for stack in originals:
            del stack._hits  # the instance attribute; the class's method shows again
