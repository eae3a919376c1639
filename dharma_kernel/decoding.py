"""``dharma generate --compile``: decoding through ``torch.compile``.

Exact routing reads each step's module choices back to the host and runs only the chosen
modules, so every routed stack would break the graph and change shape from token to token.
For compiled decoding the routed stacks compute a slot for every (module, token) pair instead
(fixed capacity with room for all, :mod:`dharma_kernel.capacity`): unchosen pairs are weighted
zero, so the tokens are exact routing's (up to float rounding), and no shape depends on the
routing. Each module then computes every token of a step; while decoding that is one token per
sequence, and the launches saved are what costs on a GPU. The prompt's forward computes every
module at every prompt token. A module that cannot run grouped (a plugin without
``grouped_tokens``) still reads its tokens back to the host, and the graph breaks there.

The growing cache is the one shape that changes, so the forward compiles with dynamic shapes: the
prompt's forward and the one-token steps compile once each, not once per length.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import DharmaError
from .grouped import group_key

# torch.compile's backend for decoding; the tests trace with dynamo's "eager" (inductor's code
# generation is torch's own, and takes a minute or more per model on a CPU).
BACKEND = "inductor"


@contextmanager
def compiled_decoding(model: nn.Module) -> Iterator[nn.Module]:
    """Within: ``model`` (a DharmaModel) with its forward compiled for generation and its routed
    stacks on every-token slots. After: the model as it was, eager. A compiler failure (torch.compile
    compiles on the first call) is a DharmaError that says how to go on without it."""
    routed = [stack for stack in model.stacks.values() if stack.composition == "routed"]
    alone = sorted(
        ref
        for stack in routed
        for ref, module in zip(stack.refs, stack.members.values(), strict=True)
        if group_key(module) is None
    )
    if alone:
        warnings.warn(
            f"{', '.join(alone)} cannot run grouped (no grouped_tokens): compiled decoding reads "
            "their tokens back to the host at every step, and the graph breaks there",
            stacklevel=3,
        )
    model.ready_for_compile()
    for stack in routed:
        stack.every_token_slots = True
    model.forward = torch.compile(model.forward, dynamic=True, backend=BACKEND)
    try:
        yield model
    except torch._dynamo.exc.TorchDynamoException as error:
        cause = getattr(error, "inner_exception", None) or error
        said = str(cause).strip().splitlines()
        raise DharmaError(
            f"torch.compile could not compile the model: {type(cause).__name__}"
            + (f": {said[0]}" if said else ""),
            hint="Run without --compile. On a CPU, torch.compile's inductor needs a C++ compiler (g++).",
        ) from None
    finally:
        del model.forward  # the class's forward again
        for stack in routed:
            stack.every_token_slots = False
