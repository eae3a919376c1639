"""Module parameters trained as a few flat tensors, under ``[train] compile``.

Thirty-seven modules at two layers own over a thousand small parameter tensors. Each one
costs the autograd engine a gradient accumulation and AdamW several ops per step, and once
torch.compile has fused the forward and backward into a few hundred kernels these per-tensor
costs are most of a step (counted on the CPU, ``benchmarks/bench_modules.py --compile``).
Here the modules' trainable parameters become one flat tensor per (device, dtype, weight
decay): each module parameter's storage is a view of its flat tensor's, so the model that is
evaluated, saved and exported is the one being trained, with its own parameter names; the
training forward reads them as views of the flat tensor (``torch.func.functional_call``), so
backward yields one gradient per flat tensor and AdamW steps one tensor.

Exact only where torch's AdamW would step every one of those parameters at every step: the
modules that compute at every step, whatever the routing (parallel and sequential stacks, and
the groupable modules of routed stacks with fixed capacity, which compute all their slots).
Under exact routing a module no token chose gets no gradient and AdamW leaves it as it was;
flattened it would still move by momentum and weight decay. Those stay as they are, and so
does everything under ``optimizer_in_backward`` (clipped per parameter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..grouped import group_key


@dataclass
class Flat:
    """One flat tensor (``leaf``) and the module parameters that are views of it, in order."""

    leaf: nn.Parameter
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.params]

    def slices(self) -> list[tuple[nn.Parameter, slice]]:
        """Each parameter and the elements of ``leaf`` it holds."""
        out, start = [], 0
        for p in self.params:
            out.append((p, slice(start, start + p.numel())))
            start += p.numel()
        return out


class FlatParameters:
    """Trainable module parameters held as flat tensors (see the module docstring).

    ``flats``: the flat tensors and their parameters; ``leaves``: the flat tensors, what the
    optimizer steps and clips in place of the parameters; ``holds(p)``: whether ``p`` is one of them.
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], decayed: set[int]) -> None:
        buckets: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
        for name, p in named:
            buckets.setdefault((p.device, p.dtype, id(p) in decayed), []).append((name, p))
        self.flats: list[Flat] = []
        self.decayed: list[bool] = []
        for (_, _, decay), members in buckets.items():
            with torch.no_grad():
                data = torch.cat([p.detach().reshape(-1) for _, p in members])
            flat = Flat(nn.Parameter(data), [n for n, _ in members], [p for _, p in members])
            for p, at in flat.slices():
                p.data = flat.leaf.detach()[at].view(p.shape)  # shares the flat tensor's storage
            self.flats.append(flat)
            self.decayed.append(decay)
        self._held = {id(p) for flat in self.flats for p in flat.params}

    @property
    def leaves(self) -> list[nn.Parameter]:
        return [flat.leaf for flat in self.flats]

    def holds(self, p: torch.Tensor) -> bool:
        return id(p) in self._held

    def views(self) -> dict[str, torch.Tensor]:
        """Every flattened parameter by its name in the model, as a view of its flat tensor that
        backward reaches the flat tensor through."""
        out: dict[str, torch.Tensor] = {}
        for flat in self.flats:
            pieces = flat.leaf.split(flat.sizes)
            for name, p, piece in zip(flat.names, flat.params, pieces, strict=True):
                out[name] = piece.view(p.shape)
        return out

    def release(self) -> None:
        """Give every parameter its own storage again (the flat tensors can then be freed):
        after training, so nothing that saves the model finds tensors that share memory."""
        with torch.no_grad():
            for flat in self.flats:
                for p in flat.params:
                    p.data = p.data.clone()


class FlatForward(nn.Module):
    """``model``'s forward with the flattened parameters read from their flat tensors."""

    def __init__(self, model: nn.Module, flat: FlatParameters) -> None:
        super().__init__()
        self.model = model
        self.leaves = nn.ParameterList(flat.leaves)
        self.flat = flat

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.flat.views(), args, kwargs, strict=False)


def always_computing(model: nn.Module) -> list[nn.Module]:
    """The modules that compute at every training step whatever the routing (see the module
    docstring): every member of a parallel or sequential stack, and the groupable members of a
    routed stack with fixed capacity."""
    out = []
    for stack in getattr(model, "stacks", {}).values():
        members = list(stack.members.values())
        if stack.composition != "routed":
            out += members
        elif stack.capacity_factor:
            out += [m for m in members if group_key(m) is not None]
    return out


def flatten_modules(model: nn.Module, decayed: set[int]) -> FlatParameters | None:
    """The trainable parameters of ``model``'s always-computing modules, flattened; None if there are none.
    ``decayed``: ids of the parameters with weight decay (one flat tensor never mixes the two)."""
    chosen = {id(p) for m in always_computing(model) for p in m.parameters() if p.requires_grad}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in chosen]
    return FlatParameters(named, decayed) if named else None


def for_compiled_training(model: nn.Module, train: Any) -> FlatParameters | None:
    """What ``train`` (a ``[train]`` section) trains flat: with ``compile`` (and not
    ``optimizer_in_backward``), the always-computing modules' trainable parameters, each flat
    tensor of one weight-decay kind (:func:`~.optim.decay_split`); else None."""
    from .optim import decay_split

    if not train.compile or train.optimizer_in_backward:
        return None
    decay, _ = decay_split(model, [p for p in model.parameters() if p.requires_grad])
    return flatten_modules(model, {id(p) for p in decay})
