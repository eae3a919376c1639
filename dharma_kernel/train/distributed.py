"""Data parallelism under ``torchrun``: process group, device, DDP or FSDP2 wrapping, reductions.

Without torchrun's environment everything here is the single-process identity, so
the loop reads the same either way. No home-made distribution layer: plain DDP, or
torch's ``fully_shard`` when ``train.distributed = "fsdp"``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import DharmaError


@dataclass(frozen=True)
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over every process (a float64 copy; the input is untouched)."""
        total = value.detach().to(torch.float64).clone()
        if self.enabled:
            dist.all_reduce(total)
        return total

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device: str | None) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when launched by it; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(want)
    except (RuntimeError, ValueError):
        raise DharmaError(
            f"--device {want}: not a device", hint="Use cpu, cuda or cuda:N (or leave it out)."
        ) from None
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise DharmaError("--device cuda: no CUDA device is available here", hint="Use --device cpu.")
    # set_device needs an index: plain "cuda" is this process's local card (0 without torchrun).
    target = torch.device(f"cuda:{local}" if want == "cuda" else want)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Dist(world, rank, local), target


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()  # no process leaves while another still talks to it
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, device: torch.device, strategy: str = "ddp") -> nn.Module:
    """The model as the loop drives it: itself, or under torchrun DDP, or itself sharded (FSDP2).

    Build the optimizer after this: sharding replaces the parameters with their shards.
    """
    if not d.enabled:
        return model
    if strategy == "fsdp":
        return shard(model)
    unused = can_leave_unused(model)
    return nn.parallel.DistributedDataParallel(
        _WithUnused(model) if unused else model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=unused,
    )


def can_leave_unused(model: nn.Module) -> bool:
    """Whether a step may give a trainable parameter no gradient: a routed stack runs only the modules
    its tokens chose, and a fine-tuning loss need not reach every part of the model. Sequential and
    parallel stacks run every module, and every module's parameters all get a gradient (the
    conformance suite checks it), so DDP need not search the graph for unused ones."""
    routed = any(getattr(s, "composition", None) == "routed" for s in getattr(model, "stacks", {}).values())
    return routed or len(getattr(model, "heads", ())) > 0


class _WithUnused(nn.Module):
    """The model, plus one parameter no forward uses, for DDP with ``find_unused_parameters``.

    DDP warns on every process, in several lines, when its first step finds no unused parameter
    (every module was chosen somewhere in the batch); later steps may well leave some unused, so
    the warning is a false positive here. This parameter is always unused, so it is never given.
    It is not the model's: the optimizer and checkpoints see ``module.model`` only.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.never_used = nn.Parameter(torch.zeros(1, device=next(model.parameters()).device))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 in place: each transformer block (with the module stack after it) is one unit whose
    parameters are gathered for its forward and backward only; the rest (embeddings, final norm,
    heads) is the root unit."""
    from torch.distributed.fsdp import fully_shard

    from ..backbone import find_blocks, num_layers

    for block in find_blocks(model.backbone, num_layers(model.config.text_config)):
        fully_shard(block)
    # FSDP2 reduce-scatters the same gradients on every process: a routed module that no token
    # chose on one process must still get a (zero) gradient there.
    for stack in getattr(model, "stacks", {}).values():
        stack.touch_unused = True
    fully_shard(model)
    return model


def drop_idle_gradients(model: nn.Module, dist: Dist) -> None:
    """Under FSDP every routed module gets a gradient, zero where no token chose it. A module that
    no token chose on any process in the whole window has no gradient in one process: drop its
    zeros, so AdamW skips it there too (zeros would still move it by momentum and weight decay)."""
    for stack in getattr(model, "stacks", {}).values():
        if not stack.touch_unused or stack.composition != "routed":
            continue
        ran = dist.sum(torch.tensor([0.0 if flag else 1.0 for flag in stack.idle]))  # processes where it ran
        for ran_somewhere, module in zip(ran.tolist(), stack.members.values(), strict=True):
            if not ran_somewhere:
                for p in module.parameters():
                    p.grad = None
        stack.idle = [True] * len(stack.idle)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every process (a collective); a plain one as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce (FSDP's reduce-scatter) on every micro-batch but the window's last."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: a switch, not a context
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()
