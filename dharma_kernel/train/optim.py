"""AdamW, its learning-rate schedules and the optimizer memory switches of ``[train]``.

``build_optimizer(model, train, total_steps, device)`` returns an :class:`Optimizer`
that the loop drives the same way whatever the switches are::

    loss.backward()  # under in_backward, each parameter is stepped here
    if optimizer.in_backward:
        finite = not optimizer.skipped_last
    else:
        norm = torch.nn.utils.clip_grad_norm_(optimizer.trainable, limit)
        finite = bool(torch.isfinite(norm))
        if finite:
            optimizer.step()
    optimizer.zero_grad()
    optimizer.schedule_step()

Switches (torchtune's, as plain booleans):

- ``optimizer_state = "bf16"``: AdamW's two moments kept in bfloat16 (4 bytes per
  trainable parameter instead of 8), parameters stay fp32: :class:`BF16AdamW`.
- ``optimizer_in_backward = true``: one AdamW per parameter, stepped from the
  parameter's post-accumulate-grad hook the moment its gradient is complete, then
  the gradient is freed, so at most a few gradients exist at once. Gradients cannot
  accumulate over micro-batches (``grad_accum`` must be 1) and there is no global
  norm to clip by: each parameter's gradient is clipped to ``max_grad_norm`` on its
  own. A parameter whose gradient is not finite is not updated and ``skipped_last``
  says so.

Weight decay applies to weight matrices only: parameters with two or more dimensions
that are not embedding tables. Biases, norm weights, 1-D module vectors (concept
directions, detector mixes) and embedding tables (token and position embeddings, and
an output head tied to them) are not decayed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import DharmaError
from ..manifest import TrainSection
from .distributed import full

__all__ = ["BF16AdamW", "Optimizer", "build_optimizer", "decay_split", "lr_factor", "separate_gradients"]

BETAS = (0.9, 0.999)
EPS = 1e-8
STATE_FORMAT = 1
ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4  # torch's OneCycleLR defaults


# -- schedules ---------------------------------------------------------------------------------


def lr_factor(schedule: str, step: int, total_steps: int, warmup_fraction: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based), as a fraction of ``learning_rate``.

    onecycle: torch's ``OneCycleLR`` (cosine, two phases, ``div_factor`` 25, ``final_div_factor``
    1e4, ``pct_start = warmup_fraction``) without its momentum cycling, so beta1 stays 0.9:
    from lr/25 up to lr over the first ``warmup_fraction`` of the steps, then down to lr/250000
    at the last step. cosine: linear warm-up over ``ceil(warmup_fraction * total_steps)``
    steps (step ``s`` at ``(s + 1) / warmup``), then cosine decay towards 0 at ``total_steps``.
    constant: the same warm-up, then constant. Steps past ``total_steps`` keep the final rate.
    """
    if schedule == "onecycle":
        return _one_cycle(step, total_steps, warmup_fraction)
    warmup = math.ceil(warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def _one_cycle(step: int, total_steps: int, warmup_fraction: float) -> float:
    # The same phase boundaries and interpolation as torch.optim.lr_scheduler.OneCycleLR.
    start, peak = 1.0 / ONECYCLE_DIV, 1.0
    final = start / ONECYCLE_FINAL_DIV
    up_end, down_end = warmup_fraction * total_steps - 1, total_steps - 1
    step = min(step, down_end)
    if step <= up_end:
        return _cosine(start, peak, step / up_end) if up_end > 0 else peak
    span = down_end - up_end
    return _cosine(peak, final, (step - up_end) / span) if span > 0 else final


def _cosine(start: float, end: float, fraction: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1)


# -- parameter groups ------------------------------------------------------------------------


def decay_split(
    model: nn.Module, params: Iterable[nn.Parameter]
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``params`` split into (weight-decayed, not decayed); see the module docstring for the rule."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, plain = [], []
    for p in params:
        (decay if p.ndim >= 2 and id(p) not in tables else plain).append(p)
    return decay, plain


@functools.cache
def fused_adamw_runs(device: str, dtype: torch.dtype) -> bool:
    """Whether this torch build's fused AdamW really steps a ``dtype`` parameter on ``device``."""
    try:
        p = torch.zeros(4, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], lr=0.1, fused=True).step()
        return bool((p.detach() != 0).all())
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError):
        return False


def separate_gradients(params: Iterable[nn.Parameter]) -> None:
    """Give each parameter a gradient of its own where backward left two holding the same memory.

    Autograd hands a gradient tensor to a parameter without copying it, and one tensor can reach
    two parameters: on the grouped path, when every module of a group has at most one token, a
    path module's ``direction`` and its adapter's output bias get the very same gradient. Clipping
    then scales that memory twice, and the two parameters step by the square of the factor.
    """
    seen: set[int] = set()
    for p in params:
        grad = p.grad
        if grad is None or grad.numel() == 0 or isinstance(grad, DTensor):  # sharded: gradients of its own
            continue
        if grad.data_ptr() in seen:
            p.grad = grad.clone()
        else:
            seen.add(grad.data_ptr())


# -- AdamW with bf16 moments ---------------------------------------------------------------


class BF16AdamW(torch.optim.Optimizer):
    """AdamW whose two moments are stored in bfloat16; parameters stay in their own dtype (fp32).

    The arithmetic is torch's AdamW (decoupled weight decay, bias correction), in fp32:
    each step reads the moments into fp32, updates moments and parameter, and writes the
    moments back with stochastic rounding. Rounding to nearest would freeze the second
    moment: its per-step change, ``1 - beta2`` = 0.1% of its size, is below half of bf16's
    resolution (2^-8 = 0.4%), so it would never move once warm. Stochastic rounding is
    unbiased, so the stored moments follow the fp32 ones on average; the random bits come
    from ``generator`` (its state is part of :class:`Optimizer`'s state, for exact resume).

    Tensors are processed in flat chunks of ``CHUNK`` elements, so the fp32 temporaries
    stay a few tens of MB whatever the parameter's size. A ``found_inf`` attribute (a
    0-dim float tensor, as torch's fused AdamW takes from a grad scaler) skips the step
    on the device without a host sync: every tensor keeps its value where it is non-zero.
    """

    CHUNK = 1 << 20

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = BETAS,
        eps: float = EPS,
        weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.generator = generator

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                self._update(p, p.grad, state, group, found_inf)
        return loss

    def _update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, found_inf: torch.Tensor | None
    ) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        skip = None if found_inf is None else found_inf.to(p.device) != 0
        step = state["step"]
        step.add_(1.0 if skip is None else (~skip).float())
        # Bias corrections as tensors: no host sync on a GPU.
        correction1 = 1 - torch.pow(beta1, step.clamp_min(1))
        correction2_sqrt = (1 - torch.pow(beta2, step.clamp_min(1))).sqrt()
        tensors = (p, grad, state["exp_avg"], state["exp_avg_sq"])
        if all(t.is_contiguous() for t in tensors):
            pieces = zip(*(t.view(-1).split(self.CHUNK) for t in tensors), strict=True)
        else:
            pieces = [tensors]  # whole tensors: the writes below go straight into them
        for param, g, m, v in pieces:
            g32 = g.float()
            m32 = m.float().lerp_(g32, 1 - beta1)
            v32 = v.float().mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
            p32 = param.to(torch.float32, copy=True).mul_(1 - lr * decay)
            p32.sub_(m32 / (v32.sqrt() / correction2_sqrt).add_(eps) * (lr / correction1))
            m_new, v_new = _stochastic_bf16(m32, self.generator), _stochastic_bf16(v32, self.generator)
            if skip is not None:
                p32 = torch.where(skip, param.float(), p32)
                m_new, v_new = torch.where(skip, m, m_new), torch.where(skip, v, v_new)
            param.copy_(p32)
            m.copy_(m_new)
            v.copy_(v_new)


def _stochastic_bf16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """fp32 -> bf16 rounding up with probability equal to the dropped fraction (unbiased)."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # keep the top 16 bits: a bf16 value
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the dropped bits are zero


# -- the optimizer the loop drives ----------------------------------------------------------


class Optimizer:
    """AdamW over the trainable parameters with a schedule and the memory switches.

    ``in_backward``: steps happen inside ``backward()``; ``step()`` is then a no-op.
    ``params``: the model's trainable parameters (``requires_grad``), in ``model.parameters()`` order.
    ``trainable``: the tensors it updates, whose gradients the loop clips: ``params``, or with
    ``flat`` (:mod:`.flat`) or ``stacked`` (:mod:`.stacked`) those they do not hold, then their
    flat tensors.
    ``lr``: the learning rate the next optimizer step uses.
    ``skipped_last``: under ``in_backward``, a gradient since the last ``zero_grad()`` was not
    finite and that parameter was not updated (always False otherwise).
    ``grad_norm``: under ``in_backward``, the global L2 norm of the gradients since the last
    ``zero_grad()``, before per-parameter clipping (None otherwise: clip as usual).
    """

    def __init__(
        self,
        model: nn.Module,
        train: TrainSection,
        total_steps: int,
        device: torch.device,
        flat: Any = None,
        stacked: Any = None,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        if (flat is not None or stacked is not None) and train.optimizer_in_backward:
            raise ValueError("flattened parameters cannot be stepped in backward (clipped per parameter)")
        if stacked is not None and (flat is not None or train.optimizer_state != "fp32"):
            raise ValueError("stacked parameters are stepped alone, with fp32 moments")
        self.train = train
        self.total_steps = total_steps
        self.in_backward = train.optimizer_in_backward
        # the model's own trainable parameters: the layout of the saved state
        self.params: list[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise DharmaError("nothing to train: every parameter is frozen", hint="Freeze fewer groups.")
        self._flat = flat
        self._stacked = stacked
        held = [p for p in self.params if flat is not None and flat.holds(p)]
        self.trainable = [
            p
            for p in self.params
            if (flat is None or not flat.holds(p)) and (stacked is None or not stacked.holds(p))
        ]
        decay, _ = decay_split(model, self.trainable)
        decayed = {id(p) for p in decay}
        if flat is not None:
            if len(held) != sum(len(f.params) for f in flat.flats):
                raise ValueError("the flattened parameters must all be trainable parameters of the model")
            self.trainable += flat.leaves
            decayed |= {id(f.leaf) for f, decays in zip(flat.flats, flat.decayed, strict=True) if decays}
        self._step = 0  # schedule position: optimizer steps taken (or skipped) so far
        self._generator: torch.Generator | None = None
        if train.optimizer_state == "bf16":
            self._generator = torch.Generator(device=device).manual_seed(train.seed)
        self._fused = train.optimizer_state == "fp32" and all(
            fused_adamw_runs(str(p.device), p.dtype) for p in self.trainable
        )
        self._owner: dict[int, torch.optim.Optimizer] = {}
        self._hooks: list[Any] = []
        self._sq_norm: torch.Tensor | None = None
        self._bad: torch.Tensor | None = None
        if self.in_backward:
            for p in self.trainable:
                self._owner[id(p)] = self._adamw([{"params": [p], "weight_decay": self._decay(p, decayed)}])
                self._hooks.append(p.register_post_accumulate_grad_hook(self._step_in_backward))
            self._optimizers = list(dict.fromkeys(self._owner.values()))
        else:
            groups = [
                {
                    "params": [p for p in self.trainable if id(p) in decayed],
                    "weight_decay": train.weight_decay,
                },
                {"params": [p for p in self.trainable if id(p) not in decayed], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            optimizer = self._adamw(groups) if groups else None  # None: the stacked ones are all
            self._owner = {id(p): optimizer for p in self.trainable}
            self._optimizers = [optimizer] if groups else []
        # the torch optimizer's parameters; the stacked ones' flat tensors are clipped, then stepped apart
        self._stepped = list(self.trainable)
        if stacked is not None:
            self.trainable += stacked.holders

    def _decay(self, p: nn.Parameter, decayed: set[int]) -> float:
        return self.train.weight_decay if id(p) in decayed else 0.0

    def _adamw(self, groups: list[dict]) -> torch.optim.Optimizer:
        lr = self.lr
        if self.train.optimizer_state == "bf16":
            return BF16AdamW(groups, lr=lr, betas=BETAS, eps=EPS, generator=self._generator)
        if self._fused:
            return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, fused=True)
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, foreach=not self.in_backward)

    # -- what the loop calls ---------------------------------------------------------------

    @property
    def lr(self) -> float:
        factor = lr_factor(self.train.schedule, self._step, self.total_steps, self.train.warmup_fraction)
        return self.train.learning_rate * factor

    @property
    def fused(self) -> bool:
        """Whether torch's fused AdamW kernel does the fp32 updates (else foreach or BF16AdamW)."""
        return self._fused

    def step(self) -> None:
        """Update every parameter that has a gradient (after backward and clipping); no-op in backward."""
        if self.in_backward:
            return
        lr = self.lr
        for optimizer in self._optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        if self._stacked is not None:
            self._stacked.step(lr, self.train.weight_decay, BETAS, EPS)

    def zero_grad(self) -> None:
        """Drop the gradients (set to None); under ``in_backward``, also forget the last backward's record."""
        for p in self._stepped:
            p.grad = None
        if self._stacked is not None:
            self._stacked.zero_grad()  # zeroed in place: the stacked tensors' gradients are views of it
        self._sq_norm = None
        self._bad = None

    def schedule_step(self) -> None:
        """Advance the learning-rate schedule by one optimizer step (taken or skipped)."""
        self._step += 1

    @property
    def skipped_last(self) -> bool:
        return self._bad is not None and bool(self._bad)

    @property
    def grad_norm(self) -> float | None:
        if not self.in_backward:
            return None
        return 0.0 if self._sq_norm is None else float(self._sq_norm.sqrt())

    def remove_hooks(self) -> None:
        """Detach the in-backward hooks, so the model can be trained by another optimizer."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- in backward ---------------------------------------------------------------------

    @torch.no_grad()
    def _step_in_backward(self, p: nn.Parameter) -> None:
        grad = p.grad
        if grad is None:
            return
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        squared = norm.square()
        self._sq_norm = squared if self._sq_norm is None else self._sq_norm + squared
        bad = ~torch.isfinite(norm)
        self._bad = bad if self._bad is None else self._bad | bad
        if self.train.max_grad_norm > 0:
            # not in place: backward may have handed this gradient tensor to another parameter too
            # (see separate_gradients), whose hook has yet to read it
            p.grad = grad * (self.train.max_grad_norm / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype)
        optimizer = self._owner[id(p)]
        optimizer.param_groups[0]["lr"] = self.lr
        if self._fused or isinstance(optimizer, BF16AdamW):
            optimizer.found_inf = bad.float()  # skipped on the device, no host sync
            optimizer.step()
        elif not bool(bad):
            optimizer.step()
        p.grad = None

    # -- exact resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Moments and step counts per trainable parameter (by index), schedule position, rounding RNG.

        The same layout whatever the switches (a flat tensor's state is given per parameter it
        holds), so a run can resume with them changed.
        Only tensors, numbers and strings: loads with ``torch.load(weights_only=True)``.
        """
        index = {id(p): i for i, p in enumerate(self.params)}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for optimizer in self._optimizers:
            for p, values in optimizer.state.items():
                if not values:
                    continue
                # sharded moments are gathered whole: every process must call this
                whole = {k: full(values[k]) for k in ("step", "exp_avg", "exp_avg_sq")}
                held = self._held_by(p)
                if held is None:
                    state[index[id(p)]] = whole
                    continue
                for param, at in held:  # views: torch.save writes the flat tensor's storage once
                    state[index[id(param)]] = {
                        "step": whole["step"],
                        "exp_avg": whole["exp_avg"][at].view(param.shape),
                        "exp_avg_sq": whole["exp_avg_sq"][at].view(param.shape),
                    }
        if self._stacked is not None:
            for key, values in self._stacked.member_state().items():
                state[index[key]] = values
        return {
            "format": STATE_FORMAT,
            "schedule_step": self._step,
            "shapes": [list(p.shape) for p in self.params],
            "state": state,
            "rng": None if self._generator is None else self._generator.get_state(),
        }

    def _held_by(self, p: torch.Tensor) -> list[tuple[nn.Parameter, slice]] | None:
        """The parameters a flat tensor ``p`` holds, each with its elements; None if ``p`` is not one."""
        for flat in self._flat.flats if self._flat is not None else ():
            if flat.leaf is p:
                return flat.slices()
        return None

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved.get("format") != STATE_FORMAT:
            raise DharmaError(f"optimizer state format {saved.get('format')!r}, expected {STATE_FORMAT}")
        shapes = [list(p.shape) for p in self.params]
        if saved["shapes"] != shapes:
            raise DharmaError(
                f"the optimizer state is for {len(saved['shapes'])} trainable parameters of other shapes "
                f"than this model's {len(shapes)}: the freeze groups or the model changed",
                hint="Resume with the run's manifest and freeze groups, or start the optimizer afresh.",
            )
        moments = torch.bfloat16 if self.train.optimizer_state == "bf16" else None
        for optimizer in self._optimizers:
            optimizer.state.clear()
        flats = self._flat.flats if self._flat is not None else []
        leaves = {id(flat.leaf) for flat in flats}
        index = {id(p): i for i, p in enumerate(self.params)}
        for p in (p for p in self._stepped if id(p) not in leaves):
            values = saved["state"].get(index[id(p)])
            if values is not None:
                self._set_state(p, values["step"], values["exp_avg"], values["exp_avg_sq"], moments)
        for flat in flats:
            self._load_flat(flat, saved["state"], index, moments)
        if self._stacked is not None:
            held = [p for p in self.params if self._stacked.holds(p)]
            self._stacked.load_member_state(
                {id(p): saved["state"][index[id(p)]] for p in held if index[id(p)] in saved["state"]}
            )
        self._step = int(saved["schedule_step"])
        if self._generator is not None and saved.get("rng") is not None:
            self._generator.set_state(saved["rng"])

    def _set_state(
        self,
        p: torch.Tensor,
        step: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        moments: Any,
    ) -> None:
        optimizer = self._owner[id(p)]
        on_device = isinstance(optimizer, BF16AdamW) or self._fused
        optimizer.state[p] = {
            "step": step.to(p.device if on_device else "cpu", torch.float32, copy=True),
            "exp_avg": _like(exp_avg, p, moments),
            "exp_avg_sq": _like(exp_avg_sq, p, moments),
        }

    def _load_flat(self, flat: Any, saved: dict, index: dict[int, int], moments: Any) -> None:
        """A flat tensor's state from its parameters' saved states: one step count for all of them,
        so they must all have the same (:func:`.flat.for_compiled_training` checks before flattening)."""
        values = [saved.get(index[id(p)]) for p in flat.params]
        steps = {None if v is None else float(v["step"]) for v in values}
        if steps == {None}:
            return
        if len(steps) > 1:
            raise DharmaError(
                "the optimizer state has different step counts for parameters that are now trained as "
                "one flat tensor (a run under FSDP, or with optimizer_in_backward, skips some)",
                hint="Resume with train.compile = false, or pass --reset-optimizer to start afresh.",
            )
        exp_avg, exp_avg_sq = (torch.zeros(flat.leaf.shape, dtype=torch.float32) for _ in range(2))
        for (_, at), value in zip(flat.slices(), values, strict=True):
            exp_avg[at] = value["exp_avg"].reshape(-1)
            exp_avg_sq[at] = value["exp_avg_sq"].reshape(-1)
        self._set_state(flat.leaf, values[0]["step"], exp_avg, exp_avg_sq, moments)


def _like(saved: torch.Tensor, p: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A saved whole moment as ``p`` holds it: on its device, in ``dtype``, sharded as ``p`` is."""
    if isinstance(p, DTensor):
        return distribute_tensor(saved.to(p.device, dtype or p.dtype), p.device_mesh, p.placements)
    # laid out as p is (a saved moment of a parameter held stacked may be a transposed view;
    # the fused step reads a moment element for element alongside its parameter)
    return torch.empty_like(p, dtype=dtype or p.dtype).copy_(saved)


def build_optimizer(
    model: nn.Module,
    train: TrainSection,
    total_steps: int,
    device: Any,
    flat: Any = None,
    stacked: Any = None,
) -> Optimizer:
    """AdamW for ``model``'s trainable parameters, already on ``device``, as ``train`` configures it.

    ``total_steps``: optimizer steps of the whole run, which the schedule spans. ``flat``: parameters
    trained as flat tensors (a :class:`.flat.FlatParameters`; it imports this module), stepped as such;
    ``stacked``: parameters held stacked (a :class:`.stacked.StackedParameters`), stepped by it.
    """
    device = torch.device(device)
    if train.optimizer_in_backward:
        _check_in_backward(train, device)
    return Optimizer(model, train, total_steps, device, flat, stacked)


def _check_in_backward(train: TrainSection, device: torch.device) -> None:
    if train.grad_accum > 1:
        raise DharmaError(
            f"train.optimizer_in_backward = true updates each parameter during backward, so gradients "
            f"cannot accumulate over train.grad_accum = {train.grad_accum} micro-batches",
            hint="Set grad_accum = 1 (raise batch_size to keep the tokens per step), "
            "or set optimizer_in_backward = false.",
        )
    fp16 = train.precision == "fp16" or (
        train.precision == "auto" and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    )
    if fp16:
        raise DharmaError(
            "train.optimizer_in_backward = true cannot run with fp16 loss scaling: the gradients "
            "would be stepped while still scaled",
            hint='Set precision = "bf16" or "fp32", or set optimizer_in_backward = false.',
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            raise DharmaError(
                "train.optimizer_in_backward = true cannot run under torchrun with several processes: "
                "each parameter would be stepped before its gradient is averaged across them",
                hint="Set optimizer_in_backward = false for distributed training.",
            )
