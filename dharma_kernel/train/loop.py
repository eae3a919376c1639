"""The training loop: one optimizer step at a time, read top to bottom.

A step reads its micro-batches (:class:`Windows`), counts their LM tokens across
every process, and weights each micro-batch's LM loss by its share of those tokens,
so the step's gradient is that of the mean over the whole window, however the
tokens fall into micro-batches. Other loss terms (concept, router balance) are
per-micro-batch means and are averaged. Then: unscale (fp16), clip, skip if not
finite, step, advance the schedule.
"""

from __future__ import annotations

import math
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import DharmaError
from ..head_data import to_device
from .distributed import Dist, drop_idle_gradients, full, is_sharded, no_sync
from .optim import separate_gradients
from .precision import LossScale, autocast
from .windows import Windows


@dataclass
class Progress:
    """What a checkpoint must carry besides weights and optimizer."""

    step: int = 0
    tokens: int = 0
    skipped: int = 0  # non-finite steps skipped in the whole run
    consecutive_skips: int = 0
    best_eval: float = math.inf
    best_step: int | None = None
    first_eval: float | None = None
    last_eval: float | None = None


@dataclass
class StepResult:
    metrics: dict[str, float]
    finite: bool


@dataclass
class Loop:
    model: nn.Module  # as driven: maybe DDP-wrapped
    raw: nn.Module  # the DharmaModel itself
    optimizer: Any  # dharma_kernel.train.optim.Optimizer
    train_data: Any  # PackedData
    eval_data: Any | None
    windows: Windows
    dist: Dist
    device: torch.device
    precision: str
    lm_weight: float
    max_grad_norm: float
    scale: LossScale
    progress: Progress = field(default_factory=Progress)
    stop_requested: bool = False

    # -- one optimizer step ------------------------------------------------------------

    def train_step(self) -> StepResult:
        self.model.train()
        started = time.perf_counter()
        batches = [self.train_data.batch(rows) for rows in self.windows.micro_batches(self.progress.step)]
        counts = [_lm_tokens(batch) for batch in batches]
        window_tokens = float(self.dist.sum(torch.tensor(sum(counts))))
        logged: dict[str, float] = defaultdict(float)
        accum = len(batches)
        for j, (batch, count) in enumerate(zip(batches, counts, strict=True)):
            batch = to_device(batch, self.device)  # head batches nest their features in head_labels
            with no_sync(self.model, last=j == accum - 1), autocast(self.precision, self.device):
                out = self.model(**batch, use_cache=False)
                loss = self._window_share(out, count, window_tokens, accum, logged)
            if self.optimizer.in_backward and not self._finite_everywhere(loss):
                # the step would happen inside backward: refuse it before any parameter moves
                return self._skipped(logged, started)
            (loss * self.scale.scale if self.scale.enabled else loss).backward()
        logged = self._reduce(logged, window_tokens)
        drop_idle_gradients(self.raw, self.dist)

        if self.optimizer.in_backward:
            finite = not getattr(self.optimizer, "skipped_last", False)
        else:
            trainable = self.optimizer.trainable
            separate_gradients(trainable)  # before anything scales gradients in place
            self.scale.unscale(trainable)
            limit = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
            norm = full(torch.nn.utils.clip_grad_norm_(trainable, limit))
            logged["grad_norm"] = float(norm)
            finite = math.isfinite(float(norm)) and math.isfinite(logged["loss"])
            if finite:
                self.optimizer.step()
            self.scale.update(finite)
        self.optimizer.zero_grad()
        if not finite:
            return self._skipped(logged, started, zeroed=True)
        self.optimizer.schedule_step()
        self.progress.step += 1
        self.progress.tokens += int(window_tokens)
        self.progress.consecutive_skips = 0
        return StepResult(self._finish(logged, window_tokens, started), True)

    def _window_share(
        self, out: Any, count: int, window_tokens: float, accum: int, logged: dict[str, float]
    ) -> torch.Tensor:
        """This micro-batch's part of the window loss, and its terms added to ``logged``."""
        lm = out.losses.get("lm")
        rest = out.loss - self.lm_weight * lm if lm is not None else out.loss
        share = count * self.dist.world / max(window_tokens, 1.0)  # DDP averages over processes
        loss = rest / accum + (self.lm_weight * lm * share if lm is not None else 0.0)
        if lm is not None:
            logged["lm_sum"] += float(lm.detach()) * count
        for name, value in out.losses.items():
            if name != "lm":
                logged[name] += float(value.detach()) / accum
        return loss

    def _reduce(self, logged: dict[str, float], window_tokens: float) -> dict[str, float]:
        names = sorted(logged)
        values = self.dist.sum(torch.tensor([logged[n] for n in names], dtype=torch.float64))
        reduced = dict(zip(names, values.tolist(), strict=True))
        lm = reduced.pop("lm_sum", 0.0) / max(window_tokens, 1.0)
        others = {n: v / self.dist.world for n, v in reduced.items()}
        total = self.lm_weight * lm + sum(_weighted(n, v, self.raw) for n, v in others.items())
        return {"loss": total, "lm": lm, **others}

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach())) else 1.0)
        return float(self.dist.sum(bad)) == 0.0

    def _skipped(self, logged: dict[str, float], started: float, zeroed: bool = False) -> StepResult:
        if not zeroed:
            self.optimizer.zero_grad()
        self.progress.skipped += 1
        self.progress.consecutive_skips += 1
        self.progress.step += 1  # the data moves on: the same batch would fail again
        self.optimizer.schedule_step()
        metrics = {k: v for k, v in logged.items() if k != "lm_sum"}
        metrics.update(skipped=1.0, seconds=time.perf_counter() - started)
        return StepResult(metrics, False)

    def _finish(self, logged: dict[str, float], tokens: float, started: float) -> dict[str, float]:
        seconds = time.perf_counter() - started
        return {
            **logged,
            "lr": float(self.optimizer.lr),
            "tokens": float(self.progress.tokens),
            "tok_per_s": tokens / max(seconds, 1e-9),
            "seconds": seconds,
        }

    # -- evaluation --------------------------------------------------------------------

    def evaluate(self, batch_size: int) -> dict[str, float]:
        """Token-weighted LM loss over the eval rows (split across processes), and perplexity;
        with concept labels, also ``activation``: module activation by concept and each module's
        detection AUC (see concept_activation), and ``eval_auc_median``, their median."""
        from ..concept_activation import ConceptActivation
        from ..evaluate import lm_totals, perplexity

        # Sharded, every process must run the same forwards: each evaluates all rows, counted once.
        sharded = is_sharded(self.raw)
        every = range(len(self.eval_data))
        rows = every if sharded else range(self.dist.rank, len(self.eval_data), self.dist.world)
        reduce = (lambda t: t) if sharded else self.dist.sum
        refs = getattr(self.raw, "module_refs", ())
        labelled = bool(getattr(self.eval_data, "refs", ()))  # packed rows with modules; head data has none
        table = ConceptActivation(refs) if refs and labelled else None
        sums = lm_totals(
            self.raw, self.eval_data, batch_size, rows, lambda: autocast(self.precision, self.device), table
        )
        loss_sum, count = reduce(torch.tensor(sums)).tolist()
        loss = loss_sum / max(count, 1.0)
        metrics: dict[str, Any] = {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": count}
        if table is not None:
            table.merge(*(reduce(total.to(self.device)) for total in table.state()))
            metrics["activation"] = table.record()
            if metrics["activation"]["auc_median"] is not None:
                metrics["eval_auc_median"] = metrics["activation"]["auc_median"]
        return metrics

    # -- stopping on request -----------------------------------------------------------

    @contextmanager
    def interrupts(self) -> Iterator[None]:
        """While inside: the first Ctrl-C (or SIGTERM) asks to finish this step, save and stop;
        a second one stops now. The handlers that were there before are put back on leaving,
        so a program (or a test run) that trains in-process keeps its own Ctrl-C afterwards."""

        def request(signum: int, frame: Any) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {signum: signal.getsignal(signum) for signum in signals}
        try:
            for signum in signals:
                signal.signal(signum, request)
        except ValueError:  # not the main thread: leave the handlers alone
            yield
            return
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _lm_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next token is predicted and counted (see losses.lm_loss).

    A head batch without LM labels counts its real input tokens: only for throughput and
    ``progress.tokens``, as no LM loss is weighted by them.
    """
    if "labels" not in batch:
        return int(batch["attention_mask"].sum())
    labels = batch["labels"][:, 1:]
    counted = labels != -100
    if "attention_mask" in batch:
        counted &= batch["attention_mask"][:, 1:].bool()
    return int(counted.sum())


def _weighted(name: str, value: float, raw: nn.Module) -> float:
    from ..losses import weight_of

    return weight_of(name, (raw.config.layout or {}).get("loss", {})) * value


def check_finite_weights(model: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> None:
    """A checkpoint never holds NaN or infinite weights (``weights``: the state dict to save, if not
    the model's own parameters)."""
    named = weights.items() if weights is not None else model.named_parameters()
    bad = [name for name, p in named if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise DharmaError(
            f"refusing to save: {len(bad)} parameter(s) are not finite (first: {bad[0]})",
            hint="The previous checkpoint is untouched; lower train.learning_rate and resume from it.",
        )
