"""Data parallelism under ``torchrun``: process group, device, DDP wrapping, reductions.

Without torchrun's environment everything here is the single-process identity, so
the loop reads the same either way. No home-made distribution layer: plain DDP.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

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


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """The model as the loop drives it: itself, or DDP under torchrun."""
    if not d.enabled:
        return model
    # Routed stacks run only the modules their tokens chose: some get no gradient in a step.
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )


def no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on every micro-batch but the window's last."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()
