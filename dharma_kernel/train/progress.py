"""What a run shows and records: a progress bar (or plain lines when piped), metrics.jsonl,
TensorBoard when asked for, and the ``dharma_train_callbacks`` of installed hook plugins.

Plain lines are log records (``logging``, shown on stderr by the CLI), so stdout keeps
only the results a script reads."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import DharmaError, error_line
from .rundir import RunDir

log = logging.getLogger(__name__)


@contextmanager
def item_bar(console: Console, total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A bar over ``total`` items while the block runs, on a terminal only (``dharma eval``);
    yields ``advance(n)``, to call as each ``n`` items are done."""
    if not console.is_terminal or console.quiet:
        yield lambda n: None
        return
    bar = Progress(TextColumn(f"{{task.completed}}/{{task.total}} {what}"), BarColumn(),
                   TimeRemainingColumn(), console=console, transient=True)  # fmt: skip
    task = bar.add_task(what, total=total)
    with bar:
        yield lambda n: bar.advance(task, n)


class Reporter:
    def __init__(
        self,
        run: RunDir,
        console: Console,
        total_steps: int,
        first_step: int,
        log_every: int,
        tensorboard: bool,
        enabled: bool,
    ) -> None:
        self.run, self.console, self.total, self.log_every = run, console, total_steps, log_every
        self.enabled = enabled
        self.callbacks = _callbacks() if enabled else []
        self.writer = _tensorboard(run.root) if tensorboard and enabled else None
        self.progress: Progress | None = None
        if enabled and console.is_terminal:
            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, status="")
            self.progress.start()
        self.started = time.perf_counter()

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.run.log({"step": step, **metrics})
        if metrics.get("skipped"):
            status = "skipped: loss or gradients not finite"
        else:
            status = f"loss {metrics['loss']:.4f}  {metrics['tok_per_s']:,.0f} tok/s  lr {metrics['lr']:.2e}"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)
        elif step % self.log_every == 0 or step == self.total or metrics.get("skipped"):
            log.info(f"step {step}/{self.total}  {status}")
        self._scalars("train", step, metrics)
        self._call("on_step", step, metrics)

    def eval(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        metrics = dict(metrics)
        activation = metrics.pop("activation", None)  # a table, not a scalar: its own record
        self.run.log({"step": step, **metrics})
        if activation is not None:
            self.run.log({"step": step, "activation": activation})
        line = f"eval at step {step}: loss {metrics['eval_loss']:.4f}" + _eval_extras(metrics)
        if self.progress is not None:
            self.progress.console.print(line)  # above the bar
        else:
            log.info(line)
        self._scalars("eval", step, metrics)
        self._call("on_eval", step, metrics)

    def saved(self, path: Path) -> None:
        if self.enabled:
            self._call("on_save", path)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()

    def _scalars(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def _call(self, method: str, *args: Any) -> None:
        for callback in self.callbacks:
            hook = getattr(callback, method, None)
            if hook is None:
                continue
            try:
                hook(*args)
            except Exception as err:  # a plugin's bug must not end a long run
                warnings.warn(
                    f"train callback {type(callback).__name__}.{method} failed: {error_line(err)}",
                    stacklevel=2,
                )


def _callbacks() -> list[Any]:
    from ..plugins import call_hook

    return [cb for offered in call_hook("dharma_train_callbacks") for cb in (offered or [])]


def _tensorboard(root: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DharmaError(
            "train.tensorboard = true, but the tensorboard package is not installed",
            hint="Run: pip install tensorboard, or set tensorboard = false "
            "(metrics.jsonl is always written).",
        ) from None
    return SummaryWriter(log_dir=str(root / "tensorboard"))


def _eval_extras(metrics: dict[str, Any]) -> str:
    """Perplexity for LM evaluation; a head's metrics (``eval_accuracy`` ...) for fine-tuning."""
    if "eval_ppl" in metrics:
        auc = f", median module AUC {metrics['eval_auc_median']:.3f}" if "eval_auc_median" in metrics else ""
        return f", perplexity {metrics['eval_ppl']:.2f}{auc}"
    skip = ("eval_loss", "eval_records", "eval_tokens")
    return "".join(f", {k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items()
                   if k.startswith("eval_") and k not in skip and isinstance(v, float))  # fmt: skip
