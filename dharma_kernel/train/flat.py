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
the groupable modules of routed stacks with fixed capacity, which compute all their slots),
and the routers of routed stacks (every token is routed; six tensors at two layers).
Under exact routing a module no token chose gets no gradient and AdamW leaves it as it was;
flattened it would still move by momentum and weight decay. Those stay as they are, and so
does everything under ``optimizer_in_backward`` (clipped per parameter). A plugin parameter
that its module's training forward never reads is the one case left: per tensor AdamW skips
it, flat it decays (by ``lr * weight_decay`` a step, if it is a matrix).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..grouped import group_key

# Each parameter starts on a 64-byte boundary of its flat tensor, as a tensor of its own would:
# kernels take other (vectorised) paths, and sum in another order, on unaligned data.
ALIGN_BYTES = 64


@dataclass
class Flat:
    """One flat tensor (``leaf``) and the module parameters that are views of it, in order, each
    from an aligned offset (the gaps hold zeros: no gradient, no update, nothing in a norm)."""

    leaf: nn.Parameter
    names: list[str]
    params: list[nn.Parameter]
    starts: list[int]

    def slices(self) -> list[tuple[nn.Parameter, slice]]:
        """Each parameter and the elements of ``leaf`` it holds."""
        return [(p, slice(at, at + p.numel())) for p, at in zip(self.params, self.starts, strict=True)]

    @property
    def pieces(self) -> list[int]:
        """The lengths ``leaf`` splits into: each parameter, then the gap after it (maybe 0)."""
        ends = [*self.starts[1:], len(self.leaf)]
        return [
            n
            for p, at, end in zip(self.params, self.starts, ends, strict=True)
            for n in (p.numel(), end - at - p.numel())
        ]


def aligned_starts(sizes: list[int], element_size: int) -> tuple[list[int], int]:
    """Where each of ``sizes`` elements starts in a flat tensor of them, each on an
    :data:`ALIGN_BYTES` boundary, and the tensor's length (also :mod:`.stacked`'s layout)."""
    step = max(1, ALIGN_BYTES // element_size)
    starts, end = [], 0
    for size in sizes:
        starts.append(end)
        end = -(-(end + size) // step) * step
    return starts, end


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
        for (device, dtype, decay), members in buckets.items():
            params = [p for _, p in members]
            starts, length = aligned_starts([p.numel() for p in params], params[0].element_size())
            leaf = nn.Parameter(torch.zeros(length, device=device, dtype=dtype))
            flat = Flat(leaf, [n for n, _ in members], params, starts)
            with torch.no_grad():
                for p, at in flat.slices():
                    flat.leaf[at].copy_(p.detach().reshape(-1))
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
        backward reaches the flat tensor through. One split per flat tensor (gaps included), so
        backward joins the gradients with one concatenation: a slice per parameter would give
        each its own gradient the size of the whole flat tensor."""
        out: dict[str, torch.Tensor] = {}
        for flat in self.flats:
            pieces = flat.leaf.split(flat.pieces)
            for name, p, piece in zip(flat.names, flat.params, pieces[::2], strict=True):
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


def flatten_modules(
    model: nn.Module, decayed: set[int], steps: dict[str, float] | None = None
) -> FlatParameters | None:
    """The trainable parameters of ``model``'s always-computing modules and routers, flattened; None
    if there are none. ``decayed``: ids of the parameters with weight decay (one flat tensor never
    mixes the two). ``steps``: AdamW's step count per parameter name in an optimizer state the run
    resumes from; None (and a warning) if those parameters' counts differ, as one flat tensor has
    one count."""
    routers = [
        p
        for s in getattr(model, "stacks", {}).values()
        if s.composition == "routed"
        for p in s.router_parameters()
    ]
    every = [p for m in always_computing(model) for p in m.parameters()] + routers
    chosen = {id(p) for p in every if p.requires_grad}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in chosen]
    if steps is not None and len({steps.get(n) for n, _ in named}) > 1:
        warnings.warn(
            "the optimizer state resumed from has different step counts for modules that a compiled "
            "run trains as one flat tensor (a run under FSDP, or with optimizer_in_backward, skips "
            "some): this run steps every parameter on its own (more per-step overhead, same result); "
            "--reset-optimizer would let it train them flat",
            stacklevel=2,
        )
        return None
    return FlatParameters(named, decayed) if named else None


def for_compiled_training(model: nn.Module, train: Any, saved: dict | None = None) -> FlatParameters | None:
    """What ``train`` (a ``[train]`` section) trains flat: with ``compile`` (and not
    ``optimizer_in_backward``), the always-computing modules' trainable parameters, each flat
    tensor of one weight-decay kind (:func:`~.optim.decay_split`); else None. ``saved``: the
    optimizer state (:meth:`.optim.Optimizer.state_dict`) the run resumes from, if any."""
    from .optim import decay_split

    if not train.compile or train.optimizer_in_backward:
        return None
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay, _ = decay_split(model, [p for _, p in trainable])
    steps = None
    # by trainable index, as the optimizer saves it; another layout is refused when it loads
    if saved is not None and saved.get("shapes") == [list(p.shape) for _, p in trainable]:
        steps = {trainable[int(i)][0]: float(v["step"]) for i, v in saved["state"].items()}
    return flatten_modules(model, {id(p) for p in decay}, steps)
