"""Fine-tuning: the trainer of ``dharma train`` started from a saved model, with a task head.

The foundation (a model or run directory) is loaded, the ``[[heads]]`` plugin is fitted
to the training records and added, and the same session trains it: same loop, optimizer,
precision, checkpoints, Ctrl-C handling and ``metrics.jsonl``. Only the data source
differs (:class:`~dharma_kernel.head_data.HeadData` batches instead of packed LM rows).
Without a head, the language model itself is fine-tuned on the data. At the end the
checkpoint ``[finetune] select`` names becomes an application directory (or, with ``merge``,
a model directory): by default the best eval score of the head's metric.

Small data needs many epochs: when ``[train]`` sets neither ``epochs`` nor ``max_steps``, the
run takes :data:`DEFAULT_EPOCHS` epochs but at least :data:`MIN_STEPS` optimizer steps (90
records in batches of 16 are 6 steps an epoch: 3 epochs left a 3-label classifier below
chance), and with an eval set it stops once ``patience`` evaluations found nothing better.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.report import DataReport
from ..errors import DharmaError
from .loop import Loop
from .precision import autocast
from .session import Summary, _Session
from .windows import Windows

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 3
MIN_STEPS = 200  # without epochs or max_steps: a 90-sentence, 3-label task reaches 1.0 held out
EVALS_PER_RUN = 20  # with an eval set, without eval_every: evaluations in a run (at least every 50 steps)


@dataclass
class HeadReport:
    train: int
    eval: int
    head: str
    config: dict[str, Any]
    data: DataReport

    @property
    def problems(self) -> list[tuple[str, int, str]]:
        return self.data.problems

    def problems_summary(self) -> str:
        return self.data.problems_summary()

    def summary(self) -> str:
        learned = {k: v for k, v in self.config.items() if isinstance(v, list) and v}
        extra = "".join(f"; {k}: {', '.join(map(str, v))}" for k, v in learned.items())
        records = f"{self.head}: {self.train} training records, {self.eval} eval records{extra}"
        return f"{self.data.summary()}\n{records}"


class FinetuneSession(_Session):
    def _plan(self) -> Any:
        from .. import registry
        from ..application import require_head
        from ..assemble import Plan
        from ..model import DharmaConfig
        from .rundir import model_directory

        manifest = self.manifest
        if len(manifest.heads) > 1:
            raise DharmaError("[finetune] trains one head at a time; list one [[heads]] table")
        self.foundation = model_directory(manifest.resolve_path(manifest.finetune.from_)).resolve()
        self.head_cls = None
        if manifest.heads:
            require_head(manifest.heads[0].plugin)
            self.head_cls = registry.load(registry.resolve(manifest.heads[0].plugin, "head"))
        config = DharmaConfig.from_pretrained(self.foundation)
        config.manifest = manifest.to_dict()
        return Plan(config=config, pretrained=None)

    def _run_root(self) -> Path:
        return self.application_dir.with_name(self.application_dir.name + "-run")

    @property
    def application_dir(self) -> Path:
        return self.manifest.resolve_path(self.options.output or self.cfg.output).resolve()

    # -- data and model ----------------------------------------------------------------

    def _data(self, latest: Path | None) -> tuple:
        from ..checkpoint import load_saved_tokenizer

        tokenizer = load_saved_tokenizer(latest or self.foundation)
        limit = getattr(tokenizer, "model_max_length", None)
        length = self.manifest.data.max_length
        if isinstance(limit, int) and 0 < limit < length:
            raise DharmaError(
                f"data.max_length: {length} is longer than the foundation's {limit} positions",
                hint=f"Pass --max-length {limit} (or less).",
            )
        if self.head_cls is None:
            data = (tokenizer, *self._lm_data(tokenizer))
        else:
            data = (tokenizer, *self._head_data(tokenizer, length))
        self.select = self._selection(has_eval=data[2] is not None, latest=latest)
        return data

    def _selection(self, has_eval: bool, latest: Path | None) -> str:
        select = self.manifest.finetune.select
        if select in ("loss", "metric") and not has_eval:
            raise DharmaError(
                f"selecting the checkpoint by eval {select} needs an eval set",
                hint="Pass --eval FILE (or list [data] eval), or --select last.",
            )
        select = select or ("metric" if has_eval else "last")
        before = _saved_selection(latest) if latest is not None else None
        if before is not None and before != select:
            # The run's best checkpoint so far was chosen by the other rule: mixing the two
            # would make the application neither the best by one nor by the other.
            raise DharmaError(
                f"{self.run_dir.root} was started with --select {before}; resuming it with "
                f"--select {select} would mix two ways of choosing the application",
                hint=f"Resume with --select {before}, or start a new run (--output DIR) to use {select}.",
            )
        # Saved with each checkpoint, so a resume can be checked against it.
        self.plan.config.manifest.setdefault("finetune", {})["select"] = select
        return select

    # -- the schedule and which checkpoint is kept ---------------------------------------

    def _total_steps(self, windows: Windows) -> int:
        cfg, explicit = self.cfg, {"epochs", "max_steps"} & self.cfg.model_fields_set
        chosen = not (self.options.max_steps or explicit)
        if chosen:
            total = max(DEFAULT_EPOCHS * windows.steps_per_epoch, MIN_STEPS)
            cfg.max_steps = total  # saved with the run and the model: the schedule as run
        else:
            total = super()._total_steps(windows)
        if "eval_every" not in cfg.model_fields_set and self.select != "last":
            cfg.eval_every = max(1, min(50, total // EVALS_PER_RUN))
        recorded = {"max_steps": cfg.max_steps, "eval_every": cfg.eval_every}
        self.plan.config.manifest["train"].update({k: v for k, v in recorded.items() if v is not None})
        if self.dist.main:
            self.console.print(self._schedule_line(total, windows, chosen))
        return total

    def _schedule_line(self, total: int, windows: Windows, chosen: bool) -> str:
        epochs = total / windows.steps_per_epoch
        line = (f"schedule: {total} steps of {windows.rows_per_step} records "
                f"({epochs:.1f} epochs of {windows.rows})")  # fmt: skip
        if chosen:
            line += (f", the default: {DEFAULT_EPOCHS} epochs but at least {MIN_STEPS} steps "
                     "(--epochs or --max-steps sets it)")  # fmt: skip
        if self.select != "last":
            line += f"; evaluating every {self.cfg.eval_every} steps"
            patience = self.manifest.finetune.patience
            if patience:
                line += f", stopping after {patience} evaluations without a better {self._score_name()}"
        return f"{line}; the application: {self._chosen_phrase()}"

    def _metric_name(self, metrics: dict[str, Any] | None = None) -> str | None:
        """The head metric ``select = "metric"`` ranks by: the head's ``metric``, else the first
        its ``metrics()`` returns; None for the LM (ranked by eval loss)."""
        if self.head_cls is None or self.select != "metric":
            return None
        if self.head_cls.metric is not None:
            return self.head_cls.metric
        names = [k[5:] for k in (metrics or {}) if k not in ("eval_loss", "eval_records")]
        return names[0] if names else None

    def _score_name(self) -> str:
        if self.select == "metric" and self.head_cls is not None:
            return f"eval {self.head_cls.metric or 'score'}"
        return "eval loss"

    def _chosen_phrase(self) -> str:
        if self.select == "last":
            return "the last checkpoint"
        return f"the checkpoint with the best {self._score_name()}"

    def _rank(self, metrics: dict[str, Any]) -> tuple[float, ...]:
        """Lower is better: the metric (higher better), ties broken by eval loss; or the loss."""
        name = self._metric_name(metrics)
        if name is not None and f"eval_{name}" in metrics:
            return (-metrics[f"eval_{name}"], metrics["eval_loss"])
        return (metrics["eval_loss"],)

    def _improves(self, metrics: dict[str, Any], progress: Any) -> bool:
        if self.select == "last" or not math.isfinite(metrics["eval_loss"]):
            return False
        if self.best_eval and self._rank(metrics) >= self._rank(self.best_eval):
            return False
        self.best_eval = {**metrics, "step": progress.step}
        return True

    def _stop_early(self, loop: Loop) -> bool:
        patience, every, step = self.manifest.finetune.patience, self.cfg.eval_every, loop.progress.step
        if self.select == "last" or not patience or loop.eval_data is None or step % every:
            return False
        best = self.best_eval.get("step", 0)
        if step - best < patience * every:
            return False
        if self.dist.main:
            self.console.print(f"stopped early at step {step}: no better {self._score_name()} "
                               f"in {patience} evaluations since step {best}")  # fmt: skip
        return True

    def _lm_data(self, tokenizer: Any) -> tuple:
        """Packed LM rows in the foundation's vocabulary (never a new tokenizer); conversations
        get the chat template and assistant-only labels (:mod:`dharma_kernel.data.chat`)."""
        from ..data import prepare_data, read_data
        from ..data.chat import ensure_chat_template

        records = read_data(self.manifest, self.options.data, self.options.strict)
        refs = [spec["ref"] for spec in self.plan.config.layout["modules"]]
        return prepare_data(self.manifest, ensure_chat_template(tokenizer), refs, records=records)

    def _head_data(self, tokenizer: Any, length: int) -> tuple:
        from ..backbone import hidden_size
        from ..head_data import encode_records, fit_head_config, read_head_records
        from ..model import build_head, plugin_config

        cls, spec = self.head_cls, self.manifest.heads[0]
        paths = self.options.data or [self.manifest.resolve_path(p) for p in self.manifest.data.train]
        if not paths:
            raise DharmaError("no training data: pass --data FILE or list [data] train = [...]")
        strict = self.manifest.data.strict if self.options.strict is None else self.options.strict
        data_report = DataReport(strict=strict)
        records = read_head_records(cls, paths, report=data_report)
        config = plugin_config(cls, {**cls.make_config(None).model_dump(), **spec.config}, "heads[0].config")
        fitted = {"plugin": cls.name, "config": fit_head_config(cls, config, records).model_dump(mode="json")}
        layout = self.plan.config.layout
        others = [h for h in layout.get("heads", []) if h["plugin"] != cls.name]
        self.plan.config.layout = {**layout, "heads": [*others, fitted]}
        self.head_spec = fitted
        encoder = build_head(fitted, hidden_size(self.plan.config.text_config))
        train_data = encode_records(encoder, records, tokenizer, length)
        eval_data = None
        if self.manifest.data.eval:
            held_out = read_head_records(
                cls, [self.manifest.resolve_path(p) for p in self.manifest.data.eval], report=data_report
            )
            eval_data = encode_records(encoder, held_out, tokenizer, length)
        report = HeadReport(len(train_data), len(eval_data or []), cls.name, fitted["config"], data_report)
        return train_data, eval_data, report

    def _model(self, latest: Path | None, build: Any) -> Any:
        model = super()._model(latest, build) if latest is not None else self._foundation_model()
        # The foundation's routers already know the concepts: fine-tuning keeps their routing loss
        # from pulling on the backbone and adapters, which are there to learn the task (on a tiny
        # chat model that pull doubled the loss left on the assistant's answers).
        for stack in model.stacks.values():
            stack.backbone_gradient = 0.0
        return model

    def _foundation_model(self) -> Any:
        from ..application import add_heads
        from ..model import DharmaModel

        model = DharmaModel.from_pretrained(self.foundation)
        torch.manual_seed(self.cfg.seed)
        if self.head_cls is not None:
            add_heads(model, [self.head_spec])
        model.config.manifest = self.plan.config.manifest
        return model

    # -- evaluation and the result -----------------------------------------------------

    def _loop(self, loop: Loop, total: int) -> Summary:
        self.trainable = [name for name, p in loop.raw.named_parameters() if p.requires_grad]
        self.first_eval, self.best_eval = self._logged_evals(loop.progress.step)
        return super()._loop(loop, total)

    def _logged_evals(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """A resumed run's first and best head evaluations, read back from its metrics.jsonl."""
        from ..hub import read_metrics

        if step == 0:
            return {}, {}
        records = read_metrics(self.run_dir.root, step)
        evals = [r for r in records if isinstance(r.get("eval_loss"), int | float) and "step" in r]
        first = next(({k: v for k, v in r.items() if k != "step"} for r in evals if r["step"] == 0), {})
        later = [r for r in evals if r["step"] > 0 and math.isfinite(r["eval_loss"])]
        return first, (min(later, key=self._rank) if later and self.select != "last" else {})

    def _eval_metrics(self, loop: Loop) -> dict[str, Any]:
        if self.head_cls is None:
            return loop.evaluate(self.cfg.batch_size)
        metrics = evaluate_head(loop.raw, loop.eval_data, self.tokenizer, self.cfg.batch_size,
                                lambda: autocast(self.precision, self.device))  # fmt: skip
        if not self.first_eval:
            self.first_eval = metrics
        return metrics

    def _summary(self, loop: Loop) -> Summary:
        summary = super()._summary(loop)
        if self.head_cls is not None:
            summary.first_eval_ppl = summary.best_eval_ppl = None
            summary.first_eval, summary.best_eval = self.first_eval, self.best_eval
        return summary

    def run(self) -> Summary:
        summary = super().run()
        if summary.interrupted or not self.dist.main:
            return summary
        from ..application import save_application
        from ..checkpoint import save
        from ..model import DharmaModel

        chosen = summary.latest if self.select == "last" else summary.best or summary.latest
        summary.selected = f"{chosen.name}, {self._chosen_phrase()}"
        first, best = self.first_eval, self.best_eval
        if first and best and self._rank(best) > self._rank(first):
            name = self._metric_name(best)
            key = f"eval_{name}" if name and f"eval_{name}" in best else "eval_loss"
            log.warning(
                f"the best checkpoint (step {best['step']}, {key} {best[key]:.4f}) is worse "
                f"than the model before fine-tuning ({key} {first[key]:.4f}); "
                "a lower learning rate or more data may help"
            )
        model = DharmaModel.from_pretrained(chosen)
        if self.manifest.finetune.merge:
            summary.application = save(model, self.application_dir, self.tokenizer)
        else:
            summary.application = save_application(
                model, self.application_dir, self.foundation, self.trainable, self.tokenizer
            )
        return summary


@torch.no_grad()
def evaluate_head(
    model: Any, data: Any, tokenizer: Any, batch_size: int, precision: Any = None, advance: Any = None
) -> dict[str, float]:
    """Mean loss per record over ``data`` (HeadData) and the head's metrics on its records;
    ``advance(n)`` is called as each batch of ``n`` records is done (a progress bar)."""
    import contextlib

    precision = precision or contextlib.nullcontext
    from ..head_data import predict_records, to_device

    head = model.heads[data.head]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, predictions = 0.0, []
    try:
        for start in range(0, len(data), batch_size):
            rows = list(range(start, min(start + batch_size, len(data))))
            with precision():
                out = model(**to_device(data.batch(rows), device), use_cache=False)
                predictions += predict_records(head, model, tokenizer, [data.records[i] for i in rows],
                                               where=f"{head.name} eval data")  # fmt: skip
            loss_sum += float(out.loss) * len(rows)
            if advance is not None:
                advance(len(rows))
    finally:
        model.train(was_training)
    scores = head.metrics(predictions, data.records)
    return {"eval_loss": loss_sum / len(data), "eval_records": float(len(data)),
            **{f"eval_{k}": float(v) for k, v in scores.items()}}  # fmt: skip


def _saved_selection(checkpoint: Path) -> str | None:
    """The ``select`` rule a fine-tuning checkpoint was saved under; None for runs saved before
    the rule was recorded."""
    from ..checkpoint import read_config

    manifest = read_config(checkpoint).get("manifest")
    select = ((manifest or {}).get("finetune") or {}).get("select")
    return select if isinstance(select, str) else None
