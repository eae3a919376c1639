"""``[train] compile = true``: the training forward through ``torch.compile``.

The loop drives a compiled wrapper of the model; everything else (evaluation, checkpoints,
freezing) sees the model itself, so saved state-dict names never carry ``_orig_mod.`` and a
compiled run resumes, loads and exports like any other. The optimizer steps the model's
parameters, those of modules that compute at every step as flat tensors (:mod:`.flat`).
Evaluation stays eager: its batches have other shapes, and compiling them too would only add
compile time.

Routed stacks run a data-dependent set of modules on a data-dependent number of tokens, so
the graph breaks there (README, "torch.compile"); what lies between the breaks is compiled.
With ``modules.capacity_factor`` (fixed capacity, :mod:`dharma_kernel.capacity`) the whole
training forward and backward is one graph.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import DharmaError
from .distributed import Dist
from .flat import FlatForward, FlatParameters


def check_compile(cfg: Any, dist: Dist) -> None:
    """Refuse the combinations a compiled run is not tested with."""
    if not cfg.compile:
        return
    if dist.enabled:
        raise DharmaError(
            "train.compile is supported on one process only, not under torchrun (DDP or FSDP)",
            hint="Set train.compile = false for a distributed run, or train on one process.",
        )
    if cfg.gradient_checkpointing:
        raise DharmaError(
            "train.compile cannot be combined with train.gradient_checkpointing",
            hint="Set one of them to false.",
        )


def for_training(model: nn.Module, cfg: Any, flat: FlatParameters | None = None) -> nn.Module:
    """What the loop calls: the model, or (``train.compile``) a compiled wrapper around it that
    shares its parameters (``flat``: those it reads from flat tensors, :mod:`.flat`).

    With a routed stack, the tokens each module gets change from step to step, so the graphs
    are compiled with dynamic shapes from the start (``dynamic=True``); otherwise the second
    step would compile every graph again (about twice the compile time on the CPU). With fixed
    capacity (``modules.capacity_factor``, :mod:`dharma_kernel.capacity`) no shape depends on
    the routing, and torch.compile decides (static shapes first).
    """
    if not cfg.compile:
        return model
    if cfg.compile_mode == "reduce-overhead" and _routing_varies(model):
        warnings.warn(
            "train.compile_mode = 'reduce-overhead': the routed stacks' token counts change every "
            "step, so CUDA graphs cover only the parts between them; set modules.capacity_factor "
            "(e.g. 1.25) for one graph over the whole step",
            stacklevel=2,
        )
    return compiled(model, cfg.compile_mode, flat)


def compiled(model: nn.Module, mode: str = "default", flat: FlatParameters | None = None) -> nn.Module:
    """``torch.compile(model)`` as training runs it (see :func:`for_training`); also what
    ``benchmarks/bench_modules.py --compile`` times."""
    varying = _routing_varies(model)
    if hasattr(model, "ready_for_compile"):  # a DharmaModel (the benchmark compiles bare backbones too)
        model.ready_for_compile()
    target = model if flat is None else FlatForward(model, flat)
    return torch.compile(target, mode=None if mode == "default" else mode, dynamic=True if varying else None)


def _routing_varies(model: nn.Module) -> bool:
    """Whether token counts change every step: a routed stack with exact routing (fixed
    capacity keeps every shape)."""
    return any(
        getattr(stack, "composition", None) == "routed" and not getattr(stack, "capacity_factor", None)
        for stack in getattr(model, "stacks", {}).values()
    )
