"""How much memory a training step needs, and which memory switches make it fit a budget.

Works on a model built on the meta device: nothing is allocated. The estimate of a
step's peak is the sum of

- parameters: every parameter at its dtype (tied tensors once);
- gradients: one per trainable parameter, or under ``optimizer_in_backward`` only
  the largest (gradients are freed as soon as their parameter is stepped); plus, for
  an embedding table tied to the output head, the lookup's dense gradient, made at the
  end of the backward before it is added to the head's;
- optimizer: AdamW's two moments per trainable parameter, fp32 or bf16;
- activations: what autograd keeps from the forward for the backward, per token
  (below), plus under bf16/fp16 autocast a 2-byte copy of every weight matrix;
- runtime: the framework itself (libraries, allocator slack, CUDA context), a constant.

The sum errs high where gradients and activations are both large, since gradients fill
while activations drain. Training ``examples/seed-262m.toml`` here (batch 1 x 96) it was
0.6 GiB above the measured peak with plain AdamW and 0.07 GiB below it with every switch
on (``benchmarks/bench_memory.py``).

Activations per token, in elements (4 bytes in fp32, ``HALF_BYTES`` under autocast),
with ``io(x)`` the sum over the weight matrices of ``x`` of their inputs plus outputs:

- each backbone block: ``BLOCK * io(block) + BLOCK_ATTENTION * heads * length``
  (the second term is the attention probabilities of the math attention path,
  which CPU training with dropout takes; flash attention on a GPU does not keep them);
- each module, at the tokens it runs at: ``MODULE * io(module)``, plus ``MODULE_ATTENTION
  * length`` per kernel attention block in it (fused attention keeps no probabilities).
  Routed, a module runs at its share ``top_k / modules`` of the tokens;
- embeddings and final norm: ``EMBEDDING * hidden``; the output: ``LOGITS * vocab`` in fp32.

With gradient checkpointing each block and each module stack keeps only its input
(``hidden`` per token) and the backward recomputes one region at a time, so the
activations are those inputs plus the largest region.

The constants were measured on small models here (GPT-2 blocks of width 128 and 256
with each module family at the tiny and seed presets, sequential and routed) by
counting the bytes autograd saves (``torch.autograd.graph.saved_tensors_hooks``);
``python benchmarks/bench_memory.py --calibrate`` prints measurement against estimate:
within -3% and +7% in each of its 72 cases. It also checks the estimate against a real
peak, the resident memory one forward and backward adds, without and with gradient
checkpointing: 1% and 8% high.
``BLOCK`` is GPT-2's (its tanh GELU keeps four intermediates of the 4x-wide MLP);
Llama-style blocks keep fewer, so their estimate errs high.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from itertools import product

import torch
from torch import nn

from ..backbone import find_blocks, num_layers
from ..blocks import CausalAttention
from ..errors import DharmaError
from ..manifest import TrainSection

__all__ = ["MemoryEstimate", "MemorySettings", "changes", "estimate", "fitting_settings", "parse_size"]

BLOCK = 1.9
BLOCK_ATTENTION = 3.0
MODULE = 1.1
MODULE_ATTENTION = 0.5
EMBEDDING = 3.0
LOGITS = 3.0
HALF_BYTES = 2.8  # autocast keeps norms, softmax and the loss in fp32: 0.7 of fp32's bytes, measured
# The process with torch, transformers and 37 plugins imported measured 0.33 GiB; the rest is slack.
RUNTIME = 512 * 2**20
GiB = 2**30


@dataclass(frozen=True)
class MemorySettings:
    """The switches that change a step's memory. ``precision = "auto"`` is counted as fp32."""

    gradient_checkpointing: bool = False
    optimizer_in_backward: bool = False
    optimizer_state: str = "fp32"  # fp32 | bf16
    precision: str = "fp32"  # fp32 | bf16 | fp16 | auto

    @classmethod
    def from_train(cls, train: TrainSection) -> MemorySettings:
        return cls(**{f.name: getattr(train, f.name) for f in fields(cls)})

    @property
    def half(self) -> bool:
        return self.precision in ("bf16", "fp16")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step's peak, by part (see the module docstring)."""

    settings: MemorySettings
    batch_size: int
    length: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.runtime

    def parts(self) -> list[tuple[str, int]]:
        names = ("parameters", "gradients", "optimizer", "activations", "runtime", "total")
        return [(name, getattr(self, name)) for name in names]


def estimate(
    model: nn.Module, batch_size: int, length: int, settings: MemorySettings | TrainSection
) -> MemoryEstimate:
    """Peak memory of one training step of ``model`` (on any device, meta included) at ``batch_size``
    sequences of ``length`` tokens."""
    if isinstance(settings, TrainSection):
        settings = MemorySettings.from_train(settings)
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    grads = [_bytes(p) for p in trainable]
    gradients = max(grads, default=0) if settings.optimizer_in_backward else sum(grads)
    # A table tied to the output head gets the lookup's dense gradient last, added into the head's.
    matrices = {id(p) for p in _weight_matrices(model)}
    tied = [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.weight.requires_grad and id(m.weight) in matrices
    ]
    gradients += max(map(_bytes, tied), default=0)
    moment_bytes = 2 if settings.optimizer_state == "bf16" else None
    optimizer = sum(2 * p.numel() * (moment_bytes or p.element_size()) for p in trainable)
    return MemoryEstimate(
        settings=settings,
        batch_size=batch_size,
        length=length,
        parameters=sum(_bytes(p) for p in params),
        gradients=gradients,
        optimizer=optimizer,
        activations=activation_bytes(model, batch_size, length, settings),
        runtime=RUNTIME,
    )


def activation_bytes(model: nn.Module, batch_size: int, length: int, settings: MemorySettings) -> int:
    """The activations part of :func:`estimate`."""
    text = model.config.text_config
    width, vocab, heads = text.hidden_size, text.vocab_size, text.num_attention_heads
    blocks = [getattr(b, "block", b) for b in find_blocks(model.backbone, num_layers(text))]
    regions = [BLOCK * _io(b) + BLOCK_ATTENTION * heads * length for b in blocks]
    regions += [_stack(stack, length) for stack in getattr(model, "stacks", {}).values()]
    if settings.gradient_checkpointing:
        per_token = len(regions) * width + max(regions, default=0)
    else:
        per_token = sum(regions)
    per_token += EMBEDDING * width
    element = HALF_BYTES if settings.half else 4
    tokens = batch_size * length
    total = tokens * (per_token * element + LOGITS * vocab * 4)
    if settings.half:
        total += 2 * sum(p.numel() for p in _weight_matrices(model))
    return int(total)


def _stack(stack: nn.Module, length: int) -> float:
    """Elements per token the module stack at one layer keeps for the backward."""
    members = list(stack.members.values())
    routed = stack.composition == "routed" and members
    share = min(1.0, stack.top_k / len(members)) if routed else 1.0  # routed: each module's tokens
    total = MODULE * _io(stack.router) if stack.router is not None else 0.0
    if stack.router is not None:
        # its normalised input, the token table's codes, and the scores, evidence and probabilities
        total += MODULE * (stack.router.weight.shape[1] + 16 + 4 * len(members))
    for module in members:
        attention = [m for m in module.modules() if isinstance(m, CausalAttention)]
        # keys and values are computed at every position, queries only at the module's tokens
        every_token = sum(_io(a.key_value) for a in attention if hasattr(a, "key_value"))
        total += MODULE * ((_io(module) - every_token) * share + every_token)
        total += MODULE_ATTENTION * len(attention) * length * share
    return total


def _io(module: nn.Module) -> int:
    """Sum over ``module``'s weight matrices of their input and output sizes."""
    return sum(p.shape[-1] + p.shape[-2] for p in _weight_matrices(module))


def _weight_matrices(module: nn.Module) -> list[nn.Parameter]:
    """Parameters with two or more dimensions, except embedding tables (looked up, not multiplied)."""
    found: dict[int, nn.Parameter] = {}
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            continue
        for p in m.parameters(recurse=False):
            if p.ndim >= 2:
                found[id(p)] = p
    return list(found.values())


def _bytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


# -- which settings fit ----------------------------------------------------------------------

CHOICES = {
    "gradient_checkpointing": (False, True),
    "optimizer_in_backward": (False, True),
    "optimizer_state": ("fp32", "bf16"),
    "precision": ("fp32", "bf16"),
}


def fitting_settings(
    model: nn.Module,
    budget_bytes: int,
    batch_size: int,
    length: int,
    current: MemorySettings | None = None,
    grad_accum: int = 1,
) -> list[MemoryEstimate]:
    """Estimates of every combination of the switches that fits ``budget_bytes``.

    Fewest changes from ``current`` (default: every switch off, fp32) first, counting the
    ``grad_accum = 1`` that ``optimizer_in_backward`` needs, then the smallest total.
    ``precision = "auto"`` counts as fp32 and ``fp16`` as bf16 (same bytes).
    """
    current = _comparable(current or MemorySettings())
    fits = []
    for values in product(*CHOICES.values()):
        settings = MemorySettings(**dict(zip(CHOICES, values, strict=True)))
        result = estimate(model, batch_size, length, settings)
        if result.total <= budget_bytes:
            fits.append(result)
    return sorted(fits, key=lambda e: (len(changes(e.settings, current, grad_accum)), e.total))


def changes(settings: MemorySettings, current: MemorySettings, grad_accum: int = 1) -> list[str]:
    """The manifest lines that turn ``current`` (with ``grad_accum``) into ``settings``, e.g.
    ``optimizer_state = "bf16"``; ``optimizer_in_backward`` brings ``grad_accum = 1``, which it needs
    (a step's memory does not depend on the accumulation count)."""
    current = _comparable(current)
    lines = []
    for name in CHOICES:
        value = getattr(settings, name)
        if value != getattr(current, name):
            lines.append(f"{name} = {str(value).lower() if isinstance(value, bool) else repr(value)}")
    if settings.optimizer_in_backward and grad_accum > 1:
        lines.append("grad_accum = 1")
    return [line.replace("'", '"') for line in lines]


def _comparable(settings: MemorySettings) -> MemorySettings:
    precision = {"auto": "fp32", "fp16": "bf16"}.get(settings.precision, settings.precision)
    return replace(settings, precision=precision)


# -- sizes as users write them --------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str, where: str = "size") -> int:
    """``"4GiB"``, ``"512MiB"``, ``"4GB"``, ``"1.5GiB"`` or a plain number of bytes, as bytes."""
    match = _SIZE.match(text)
    unit = match[2].lower() if match else None
    if match is None or unit not in _UNITS or float(match[1]) * _UNITS[unit] < 1:
        raise DharmaError(
            f"{where}: {text!r} is not a memory size",
            hint="Write a number with a unit, e.g. 4GiB, 512MiB, 4GB, or a plain number of bytes.",
        )
    return int(float(match[1]) * _UNITS[unit])


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"
