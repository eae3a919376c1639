"""A training run's metrics.jsonl, read back as series: what ``dharma report`` plots.

The trainer (train/progress.py) writes three kinds of record, each with ``step``:
a training step (``loss``, its components such as ``lm``, ``concept`` and
``router_balance@0``, ``lr``, ``tok_per_s``, ...), an evaluation (``eval_loss``,
``eval_ppl``) and, with concept labels, a table of module activation by concept
(``activation``, see concept_activation.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DharmaError
from .train.rundir import RunDir, read_metric_lines

# Step records' numbers that are not losses.
NOT_LOSSES = {"step", "grad_norm", "lr", "tokens", "tok_per_s", "seconds", "skipped"}


@dataclass
class RunMetrics:
    path: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    activations: list[dict[str, Any]] = field(default_factory=list)  # {"step": N, **table}
    skipped_lines: list[int] = field(default_factory=list)

    def series(self, key: str, records: str = "steps") -> tuple[list[int], list[float]]:
        """Steps and finite values of ``key`` in the step (or ``evals``) records that have it."""
        xs, ys = [], []
        for record in getattr(self, records):
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                xs.append(record["step"])
                ys.append(float(value))
        return xs, ys

    def loss_components(self) -> list[str]:
        """``loss`` first, then every other logged loss in the order first seen."""
        names: dict[str, None] = {}
        for record in self.steps:
            for key, value in record.items():
                if key not in NOT_LOSSES and isinstance(value, int | float) and not isinstance(value, bool):
                    names[key] = None
        return sorted(names, key=lambda name: name != "loss")

    def best_eval(self) -> dict[str, Any] | None:
        """The evaluation after step 0 with the lowest eval loss (the one the trainer keeps as best)."""
        scored = [r for r in self.evals if r["step"] > 0 and isinstance(r.get("eval_loss"), int | float)]
        return min(scored, key=lambda r: r["eval_loss"]) if scored else None

    def head_metrics(self) -> list[str]:
        """The head metrics evaluations logged (``eval_accuracy``, ``eval_f1``, ...), in order first seen."""
        plain = {"eval_loss", "eval_ppl", "eval_tokens", "eval_records", "eval_auc_median"}
        names: dict[str, None] = {}
        for record in self.evals:
            for key, value in record.items():
                if key.startswith("eval_") and key not in plain and isinstance(value, int | float):
                    names[key] = None
        return list(names)


def read_run(run_dir: str | Path) -> RunMetrics:
    """The metrics of the run in ``run_dir``; a DharmaError if it is not a run or logged nothing."""
    root = Path(run_dir)
    if not root.exists():
        raise DharmaError(f"{root}: no such directory", hint="Give the run directory `dharma train` wrote.")
    if not root.is_dir():
        raise DharmaError(
            f"{root} is a file, not a run directory", hint="Give the directory `dharma train` wrote."
        )
    run = RunDir(root)
    if not run.metrics.exists():
        if run.link("latest") is None and not (root / "manifest.json").exists():
            raise DharmaError(
                f"{root} is not a training run: it has no metrics.jsonl and no latest checkpoint",
                hint="Give the directory `dharma train` wrote (train.output in the manifest, or --output).",
            )
        raise DharmaError(
            f"{run.metrics} is missing: this run logged no metrics",
            hint="Metrics are written from the first step; train for at least one step.",
        )
    records, torn = read_metric_lines(run.metrics)
    metrics = RunMetrics(root, skipped_lines=[] if torn is None else [torn])
    by_kind: dict[str, dict[int, dict[str, Any]]] = {"steps": {}, "evals": {}, "activations": {}}
    for number, _, record in records:
        if "activation" in record:
            if not _is_table(record["activation"]):
                raise DharmaError(
                    f"{run.metrics}, line {number}: 'activation' is not a table of modules by concepts",
                    hint="It needs lists modules, concepts, tokens (one per concept) and mean (a row per "
                    "module, a number or null per concept).",
                )
            kind, record = "activations", {"step": record["step"], **record["activation"]}
        elif "eval_loss" in record or "eval_ppl" in record:
            kind = "evals"
        else:
            kind = "steps"
        by_kind[kind][record["step"]] = record  # a resumed run's repeated step: the later record wins
    for kind, records in by_kind.items():
        setattr(metrics, kind, [records[step] for step in sorted(records)])
    if not (metrics.steps or metrics.evals):
        raise DharmaError(
            f"{run.metrics} has no step or eval records",
            hint="Train for at least one step (`dharma train`), then run the report again.",
        )
    return metrics


def _is_table(table: Any) -> bool:
    if not isinstance(table, dict) or not all(
        isinstance(table.get(key), list) for key in ("modules", "concepts", "tokens", "mean")
    ):
        return False
    width = len(table["concepts"])
    return (
        len(table["tokens"]) == width
        and len(table["mean"]) == len(table["modules"])
        and all(isinstance(row, list) and len(row) == width for row in table["mean"])
        and all(v is None or isinstance(v, int | float) for row in table["mean"] for v in row)
    )
