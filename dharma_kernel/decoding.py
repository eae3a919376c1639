"""``dharma generate --compile``: decoding through ``torch.compile``.

Exact routing reads each step's module choices back to the host and runs only the chosen
modules, so every routed stack would break the graph and change shape from token to token.
For compiled decoding the routed stacks compute a slot for every (module, token) pair instead
(fixed capacity with room for all, :mod:`dharma_kernel.capacity`): unchosen pairs are weighted
zero, so the tokens are exact routing's, and no shape depends on the routing. Each module then
computes every token of a step; while decoding that is one token per sequence, and the launches
saved are what costs on a GPU. The prompt's forward computes every module at every prompt token.

The growing cache is the one shape that changes, so the model compiles with dynamic shapes: the
prompt's forward and the one-token steps compile once each, not once per length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from .errors import DharmaError

T = TypeVar("T")
# torch.compile's backend for decoding; the tests trace with "aot_eager" (inductor's code
# generation is torch's own, and takes a minute or more per model on a CPU).
BACKEND = "inductor"


def compile_for_decoding(model: nn.Module) -> nn.Module:
    """``model``, compiled in place for generation (its parameters and names unchanged)."""
    device = next(model.parameters()).device
    for stack in getattr(model, "stacks", {}).values():
        stack.ready_for_compile(device)
        if stack.composition == "routed":
            stack.every_token_slots = True
    model.compile(dynamic=True, backend=BACKEND)
    return model


def compiling(run: Callable[[], T]) -> T:
    """``run()``, where a compiler failure (torch.compile compiles on the first call) becomes a
    DharmaError that says how to go on without it."""
    try:
        return run()
    except torch._dynamo.exc.BackendCompilerFailed as error:
        cause = getattr(error, "inner_exception", None) or error
        said = str(cause).strip().splitlines()
        raise DharmaError(
            f"torch.compile could not compile the model: {type(cause).__name__}"
            + (f": {said[0]}" if said else ""),
            hint="Run without --compile. On a CPU, torch.compile's inductor needs a C++ compiler (g++).",
        ) from None
