"""``Linear``: the kernel blocks' linear layer. On the CPU in float32 it multiplies with oneDNN.

PyTorch's CPU float32 ``nn.Linear`` calls MKL's sgemm. Routed modules multiply few tokens by
large weights (a module sees ~30 of a batch's 512 tokens), where sgemm is slow. oneDNN, which
PyTorch ships for its own compiled CPU kernels (``torch.ops.mkldnn._linear_pointwise``),
measured on a 2-core AMD EPYC (cold weights, [N, 768] x [768, 3100]): forward 2.2x sgemm at
N = 35 (266 vs 120 GFLOP/s), input gradient 3.2x, weight gradient 1.7x; on large products
sgemm peaks near 215 GFLOP/s there, oneDNN near 450. Results equal ``F.linear`` to float32
rounding. Token counts are padded to a few sizes (:func:`bucket`) so that oneDNN's compiled
kernels are reused.

It is the same module as ``nn.Linear`` (a subclass: same parameters and state-dict names,
found by tools that look for ``nn.Linear``). It falls back to ``F.linear`` for every other
device and dtype, for small weights (where sgemm is as fast), under CPU autocast, while a
graph is traced or compiled (export), for ``torch.func`` transforms, forward-mode AD and
tensor subclasses, when this PyTorch has no oneDNN, and when ``DHARMA_ONEDNN=0``. Unlike
``nn.Linear`` its gradient is not differentiable again (no double backward) and it cannot be
scripted with ``torch.jit.script``. Measured on one AMD CPU only; Intel CPUs were not.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this PyTorch multiplies with oneDNN here and gets ``F.linear``'s answers, forward and
    both gradients (checked once)."""
    if os.environ.get("DHARMA_ONEDNN", "1") == "0":
        return False
    rng = torch.Generator().manual_seed(0)  # not the global one: training stays reproducible
    x, weight, bias, grad = (
        torch.randn(*shape, generator=rng, device="cpu", dtype=torch.float32)  # whatever the defaults
        for shape in ((3, 8), (5, 8), (5,), (3, 5))
    )
    try:
        pairs = (
            (_matmul(x, weight, bias), F.linear(x, weight, bias)),
            (_matmul(grad, weight.t(), None), grad @ weight),  # a transposed weight: the input gradient
            (_matmul(grad.t().contiguous(), x.t().contiguous(), None), grad.t() @ x),
        )
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):  # no oneDNN, another signature
        return False
    return all(torch.allclose(got, expected, atol=1e-5) for got, expected in pairs)


# Below this many weight elements sgemm is as fast: oneDNN's ~25 us more per call outweighs it
# (measured: 768 x 24 in 1.8x the time, 768 x 128 even, 768 x 768 at 16 tokens 0.7x).
SMALLEST_WEIGHT = 1 << 17
_sgemm_only = False


@contextlib.contextmanager
def sgemm_only() -> Iterator[None]:
    """Within it, every ``Linear`` multiplies with ``F.linear`` (to compare the two). Process-wide;
    let it cover the backward pass too (checkpointing recomputes forwards there)."""
    global _sgemm_only
    before, _sgemm_only = _sgemm_only, True
    try:
        yield
    finally:
        _sgemm_only = before


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [N, in] @ weight.T [in, out] + bias`` by oneDNN (``weight`` may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def bucket(rows: int) -> int:
    """``rows`` rounded up to a few sizes: powers of two to 8, then two sizes per doubling to 64
    and four above (9 -> 12, 33 -> 48, 65 -> 80, 300 -> 320).

    oneDNN compiles a kernel per shape and keeps the last 1024; routed modules see a new
    token count almost every call, and there are some 25 weight shapes and 3 products each.
    Padding with zero rows lets the compiled kernels be reused: at most half more rows up to
    64, where a product costs about its weight's reading anyway; at most a quarter above.
    (Four sizes per doubling below 64 too: 1.7 times the kernels, and slower steps, measured.)
    """
    if rows <= 8:
        return 1 << max(rows - 1, 0).bit_length()
    step = 1 << ((rows - 1).bit_length() - (2 if rows <= 64 else 3))
    return -(-rows // step) * step


def _padded(x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[0]
    extra = bucket(rows) - rows
    return x if not extra else torch.cat([x, x.new_zeros(extra, *x.shape[1:])])


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows, x = len(x), _padded(x)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.rows = bias is not None, rows
        out = _matmul(x, weight, bias)
        # Drop the padding rows in place: a slice would be a view made in a custom Function,
        # which autograd forbids callers to modify in place (as nn.ReLU(inplace=True) does).
        return out if len(out) == rows else out.resize_(rows, out.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = _padded(grad.contiguous())
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        grad_x = _matmul(grad, weight.t(), None)[: ctx.rows] if needs_x else None
        # grad.T @ x, as oneDNN's "input times weight transposed": the small [N, *] sides are copied
        grad_weight = _matmul(grad.t().contiguous(), x.t().contiguous(), None) if needs_weight else None
        grad_bias = grad.sum(0) if ctx.has_bias and needs_bias else None
        return grad_x, grad_weight, grad_bias


# private too: a torch without it has no transforms we know of
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def plain(*tensors: torch.Tensor) -> bool:
    """Plain tensors (or parameters) outside functorch transforms and forward-mode AD: what a
    custom autograd Function without rules for those may take (fake, meta and distributed
    tensors, ``torch.func`` and dual numbers take plain ops instead)."""
    return (
        all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)
        and not _functorch_active()
        and getattr(forward_ad, "_current_level", -1) < 0  # private: absent in a later torch = no dual level
    )


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        not _sgemm_only
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and weight.numel() >= SMALLEST_WEIGHT
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and type(x) is torch.Tensor
        and plain(x, weight)
        and onednn_linear_available()
    )


class Linear(nn.Linear):
    """``nn.Linear`` that multiplies with oneDNN on the CPU in float32 (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return _OneDNNLinear.apply(flat, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
