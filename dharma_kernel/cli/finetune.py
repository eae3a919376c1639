"""``dharma finetune`` and ``dharma predict``, and the head half of ``dharma eval``.

Registered on :data:`dharma_kernel.cli.app`.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import DharmaError
from .options import FreezeOption, JsonOption, QuietOption, StrictOption
from .output import _quiet_transformers, echo_json, err, interrupted_line, out, print_summary_json, warn


class Select(StrEnum):
    metric = "metric"
    loss = "loss"
    last = "last"


def finetune(
    foundation: Annotated[
        Path, typer.Argument(help="A saved model, or a run directory (its best checkpoint).")
    ],
    data: Annotated[list[str], typer.Option("--data", help="Training data files, directories or globs.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The application directory to write.")],
    head: Annotated[
        str | None, typer.Option("--head", help="Task head plugin (e.g. classification); none: the LM.")
    ] = None,
    head_options: Annotated[
        list[str] | None,
        typer.Option("--head-option", help="A head config value, KEY=VALUE (JSON or text); repeatable."),
    ] = None,
    eval_data: Annotated[
        list[str] | None, typer.Option("--eval", help="Held-out data, evaluated during training.")
    ] = None,
    freeze: FreezeOption = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Write a standalone model directory, not an application.")
    ] = False,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=1, help="Default: 3 epochs but at least 200 steps (small data)."),
    ] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    learning_rate: Annotated[float, typer.Option("--learning-rate", min=0.0)] = 1e-3,
    max_length: Annotated[
        int | None, typer.Option("--max-length", min=8, help="Tokens per record (default: up to 256).")
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option("--eval-every", min=1, help="Evaluate every N steps (default: 20 times, at most 50)."),
    ] = None,
    select: Annotated[
        Select | None,
        typer.Option(
            "--select",
            help="The checkpoint that becomes the application: the best eval "
            "metric (the default with --eval), the lowest eval loss, or the last one.",
        ),
    ] = None,
    patience: Annotated[
        int,
        typer.Option(
            "--patience",
            min=0,
            help="With --eval: stop after N evaluations without a better checkpoint (0: never).",
        ),
    ] = 5,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run beside the output.")] = False,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda.")] = None,
    strict: StrictOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Fine-tune a foundation model on task data; writes an application directory (or, --merge, a model)."""
    from ..manifest import Manifest
    from ..train.run import TrainOptions
    from ..train.run import train as run_training

    _quiet_transformers()
    if max_length is None:
        max_length = _default_length(foundation)
    manifest = Manifest.from_dict(
        {
            "model": {"name": Path(output).name or "application"},
            "heads": [{"plugin": head, "config": _key_values(head_options, "--head-option")}] if head else [],
            "finetune": {"from": str(foundation), "merge": merge, "patience": patience,
                         "select": select and select.value},
            "freeze": {"groups": freeze or []},
            "data": {"train": data, "eval": eval_data or [], "max_length": max_length, "eval_fraction": 0.0},
            "train": {
                "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
                "output": output, "log_every": 10, "warmup_fraction": 0.1, "precision": "auto",
                # only what was given: the session chooses the schedule for what was not
                **_given(epochs=epochs, max_steps=max_steps, eval_every=eval_every),
            },
        }
    )  # fmt: skip
    summary = run_training(manifest, TrainOptions(resume=resume, device=device, strict=strict), out)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if not as_json:
        return report_finetune(summary)
    print_summary_json(summary)
    _exit_if_interrupted(summary)


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _key_values(items: list[str] | None, flag: str, parse: bool = True) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict; with ``parse``, a value that parses as JSON (numbers, true,
    lists) is that, else every value is the text as given."""
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise DharmaError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            values[key] = json.loads(text) if parse else text
        except json.JSONDecodeError:
            values[key] = text
    return values


def report_finetune(summary: Any) -> None:
    """What ``dharma finetune`` (and ``dharma train`` on a [finetune] manifest) prints at the end."""
    out.print(f"trained {summary.steps} steps; non-finite steps skipped: {summary.skipped}")
    if summary.best_eval:
        first = summary.first_eval
        for name, value in summary.best_eval.items():
            if name.startswith("eval_") and name != "eval_records":
                start = f" (at the start: {first[name]:.4f})" if name in first else ""
                out.print(f"{name} {value:.4f} at step {summary.best_eval['step']}{start}")
    elif summary.best_eval_ppl is not None:
        out.print(f"best eval perplexity {summary.best_eval_ppl:.2f} at step {summary.best_step}")
    out.print(f"run directory: {summary.output}")
    _exit_if_interrupted(summary)
    from ..application import is_application

    kind = "application" if is_application(summary.application) else "model"  # --merge writes a model
    chosen = f" (from {summary.selected})" if summary.selected else ""
    out.print(f"{kind}: {summary.application}{chosen}")


def _exit_if_interrupted(summary: Any) -> None:
    if summary.interrupted:
        err.print(interrupted_line(summary.steps, summary.latest, "the same command with --resume"))
        raise SystemExit(130)


def _default_length(foundation: Path) -> int:
    from ..backbone import context_length
    from ..checkpoint import read_config
    from ..train.rundir import model_directory

    config = read_config(model_directory(foundation))
    text = config.get("text_config") or {}
    return min(256, context_length(text, default=256))


def predict(
    application: Annotated[Path, typer.Argument(help="An application, or a model directory with a head.")],
    text: Annotated[str | None, typer.Argument(help="The text (the record's 'text' field).")] = None,
    question: Annotated[str | None, typer.Option("--question", help="The record's 'question' field.")] = None,
    context: Annotated[str | None, typer.Option("--context", help="The record's 'context' field.")] = None,
    inputs: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="Any record field, as KEY=VALUE (repeatable).")
    ] = None,
    head: Annotated[
        str | None, typer.Option("--head", help="Which head, when the model has several.")
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run the application's head on one record: a label and probabilities, an answer span, a translation."""
    import torch

    from ..application import load_application
    from ..head_data import pick_head, predict_records

    _quiet_transformers()
    # a field is the text as given, never parsed as JSON
    record = {"question": question, "context": context, **_key_values(inputs, "--input", parse=False)}
    record = {k: v for k, v in record.items() if v is not None}
    model, tokenizer = load_application(application)
    chosen = pick_head(model, head)
    if text is not None:  # the argument fills the head's first input: text, source, ...
        record.setdefault(type(chosen).inputs[0], text)
    missing = [field for field in type(chosen).inputs if not record.get(field)]
    if missing:
        raise DharmaError(
            f"the {chosen.name} head needs {', '.join(missing)}",
            hint="Give the text as the argument, or --question/--context, or --input FIELD=VALUE.",
        )
    model.eval()
    with torch.no_grad():
        prediction = predict_records(chosen, model, tokenizer, [record])[0]
    if as_json:
        typer.echo(json.dumps(prediction, ensure_ascii=False, indent=2))
    else:
        out.print(chosen.format_prediction(prediction), markup=False, emoji=False)  # silent under --quiet


def has_head(path: Path) -> bool:
    """Whether ``path`` is an application or a model (or run) directory with a head; reads JSON only."""
    from ..application import is_application, read_application
    from ..checkpoint import read_config
    from ..train.rundir import model_directory

    if is_application(path):
        return bool(read_application(path).get("heads"))
    try:
        layout = read_config(model_directory(path)).get("layout")
    except DharmaError:
        return False  # loading the model says what is wrong
    return isinstance(layout, dict) and bool(layout.get("heads"))


def eval_head(
    path: Path,
    data: list[str],
    batch_size: int,
    head: str | None,
    as_json: bool,
    max_length: int | None,
    strict: bool = False,
) -> None:
    """``dharma eval`` on a model with a head: its mean loss and metrics on ``data``."""
    from ..application import load_application
    from ..data.report import DataReport
    from ..evaluate import eval_length
    from ..head_data import encode_records, pick_head, read_head_records
    from ..train.finetune import evaluate_head
    from ..train.progress import item_bar

    _quiet_transformers()
    model, tokenizer = load_application(path)
    chosen = pick_head(model, head)
    report = DataReport(strict=strict)
    records = read_head_records(type(chosen), data, report=report)
    if report.problems:
        warn(report.problems_summary())
    length = eval_length(model, max_length)
    if not as_json:
        out.print(report.summary())  # as dharma train prints it
    encoded = encode_records(chosen, records, tokenizer, length)
    with item_bar(err, len(encoded), "records") as advance:
        result = evaluate_head(model, encoded, tokenizer, batch_size, advance=advance)
    metrics = {k.removeprefix("eval_"): v for k, v in result.items()}
    metrics["records"] = int(metrics["records"])
    if as_json:
        echo_json({"model": str(path), "head": chosen.name, "data": report.as_json(), "max_length": length,
                   **metrics})  # fmt: skip
        return
    out.print(f"{path}: {chosen.name} head, {metrics.pop('records')} records of up to {length} tokens")
    for name, value in metrics.items():
        out.print(f"{name} {value:.4f}")
