"""``dharma train``, ``dharma eval`` and ``dharma generate``: the commands that run a model.

Registered on :data:`dharma_kernel.cli.app`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..ablation import Ablation
from ..errors import DharmaError
from .explain import print_table
from .finetune import eval_head, has_head, report_finetune
from .options import (
    DataOption,
    FreezeOption,
    JsonOption,
    MaxNewTokensOption,
    QuietOption,
    StrictOption,
    TemperatureOption,
    TopPOption,
)
from .output import _quiet_transformers, echo_json, err, interrupted_line, out, print_summary_json, warn


def train(
    manifest: Annotated[Path, typer.Argument(help="The manifest TOML file.")],
    freeze: FreezeOption = None,
    data: DataOption = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Run directory (default: train.output).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in the output directory.")
    ] = False,
    reset_optimizer: Annotated[
        bool,
        typer.Option(
            "--reset-optimizer", help="With --resume: fresh optimizer state (after a freeze change)."
        ),
    ] = False,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after this many steps.")
    ] = None,
    run_modules: Annotated[
        bool,
        typer.Option(
            "--run-modules",
            help="With --resume: keep the run's modules when the manifest's include now means others.",
        ),
    ] = False,
    strict: StrictOption = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda (default: cuda when available).")
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train the model a manifest describes; checkpoints, metrics and best model go to the run directory."""
    from ..manifest import load_manifest

    resolved = load_manifest(manifest)
    require_manifest_paths(resolved, replaced_data=bool(data))  # before torch is imported
    from ..train.run import TrainOptions
    from ..train.run import train as run_training

    _quiet_transformers()
    for flag, given in (("--reset-optimizer", reset_optimizer), ("--run-modules", run_modules)):
        if given and not resume:
            raise DharmaError(f"{flag} only applies with --resume")
    options = TrainOptions(
        data=data, output=output, resume=resume, reset_optimizer=reset_optimizer, run_modules=run_modules,
        max_steps=max_steps, freeze=freeze or [], strict=strict, device=device,
    )  # fmt: skip
    summary = run_training(resolved, options, out)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, the main process reports
    if as_json:
        print_summary_json(summary)
    elif summary.application is not None or summary.best_eval:  # a [finetune] manifest
        return report_finetune(summary)
    else:
        _report_training(summary)
    if summary.interrupted:
        resume = f"dharma train {escape(str(manifest))} --resume"
        err.print(interrupted_line(summary.steps, summary.latest, resume))
        raise SystemExit(130)


def require_manifest_paths(manifest, replaced_data: bool = False) -> None:
    """A DharmaError naming the first path the manifest reads (its data, unless --data replaces the
    training data; a fine-tuning foundation) that does not exist, before anything heavy is imported."""
    from ..data.paths import expand_paths

    data = [*([] if replaced_data else manifest.data.train), *manifest.data.eval]
    expand_paths([manifest.resolve_path(path) for path in data])
    if manifest.finetune is not None and not manifest.resolve_path(manifest.finetune.from_).exists():
        raise DharmaError(
            f"[finetune] from: {manifest.resolve_path(manifest.finetune.from_)}: no such file or directory",
            hint="Name the foundation model or run directory to fine-tune, relative to the manifest.",
        )


def _report_training(summary) -> None:
    first, best = summary.first_eval_ppl, summary.best_eval_ppl
    out.print(
        f"trained {summary.steps} steps, {summary.tokens:,} tokens; "
        f"non-finite steps skipped: {summary.skipped}"
    )
    if best is not None:
        start = f" (from {first:.2f} at the start)" if first is not None else ""
        out.print(f"best eval perplexity {best:.2f} at step {summary.best_step}{start}")
    out.print(f"run directory: {summary.output}; best model: {summary.best or summary.latest}")


def eval_command(
    model_dir: Annotated[
        Path, typer.Argument(help="A saved model, or a run directory (its best checkpoint).")
    ],
    data: Annotated[list[str], typer.Option("--data", help="Held-out data files, directories or globs.")],
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length", min=8, help="Tokens per sequence (default: as trained, within its positions)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    strict: StrictOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    head: Annotated[str | None, typer.Option("--head", help="With several task heads: which one.")] = None,
    ablate: Annotated[
        Ablation | None,
        typer.Option("--ablate", help="Also perplexity with each family (module, all) switched off."),
    ] = None,
) -> None:
    """Perplexity on held-out text, and each module's activation ROC-AUC against its concept labels;
    for an application or a model with a task head, the head's loss and metrics on its records."""
    if has_head(model_dir):
        return eval_head(model_dir, data, batch_size, head, as_json, max_length, bool(strict))
    from ..application import is_application, load_application
    from ..concept_activation import ConceptActivation
    from ..data import DataReport, clean_records, pack, read_records
    from ..evaluate import eval_length, lm_totals, perplexity
    from ..train.progress import item_bar
    from ..train.rundir import model_directory

    _quiet_transformers()
    model, tokenizer = load_application(model_dir)  # a fine-tuned language model too: foundation + adapter
    directory = model_dir if is_application(model_dir) else model_directory(model_dir)
    report = DataReport()
    records = clean_records(read_records(data, strict=bool(strict), report=report), report=report)
    if report.problems:
        warn(report.problems_summary())
    if not records:
        raise DharmaError(f"--data {' '.join(data)}: no text to evaluate on", hint=report.summary())
    length = eval_length(model, max_length)
    if not as_json:
        out.print(report.summary())  # as dharma train prints it
    packed = pack(records, tokenizer, length, refs=model.module_refs)
    table = ConceptActivation(model.module_refs) if model.module_refs else None
    with item_bar(err, len(packed), f"sequences of {length} tokens") as advance:
        loss_sum, count = lm_totals(model, packed, batch_size, activation=table, advance=advance)
    loss = loss_sum / max(count, 1.0)
    detection = table.record() if table is not None else None
    result = {
        "model": str(directory),
        "data": report.as_json(),
        "max_length": length,
        "sequences": len(packed),
        "tokens": int(count),
        "loss": loss,
        "perplexity": perplexity(loss),
        "auc": detection["auc"] if detection else {},
        "auc_median": detection["auc_median"] if detection else None,
    }
    if ablate is not None:
        from ..ablation import ablate as ablation_rows

        result["ablation"] = [asdict(row) for row in ablation_rows(model, packed, batch_size, ablate)]
    if as_json:
        echo_json(result)
        return
    out.print(f"{directory}: {int(count):,} tokens in {len(packed):,} sequences of up to {length}, "
              f"loss {loss:.4f}, perplexity {perplexity(loss):.2f}")  # fmt: skip
    if "ablation" in result:
        _print_ablation(result["ablation"])
    if detection:
        print_detection(detection)


def print_detection(detection: dict) -> None:
    """Each module's concept-detection AUC over the eval tokens, with the tokens it rests on."""
    from rich.table import Table

    table = Table("module", "AUC", "positive", "negative", "", box=None)
    for ref, value in detection["auc"].items():
        auc = "-" if value["auc"] is None else f"{value['auc']:.3f}"
        table.add_row(ref, auc, f"{value['positives']:,}", f"{value['negatives']:,}", value["reason"] or "")
    out.print(table)
    median = detection["auc_median"]
    measured = sum(value["auc"] is not None for value in detection["auc"].values())
    out.print(
        f"median module AUC {'-' if median is None else f'{median:.3f}'} over {measured} of "
        f"{len(detection['auc'])} modules. A module's score at a token is its concept probability "
        "(routed: the router's); positive tokens are those labelled with its concept so far."
    )


def _print_ablation(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table("switched off", "modules", "loss", "perplexity", "change", box=None)
    for row in rows:
        full = row["off"] is None
        name, change = ("none (full model)", "") if full else (row["off"], f"{row['change']:+.2%}")
        table.add_row(name, str(row["modules_off"]), f"{row['loss']:.4f}", f"{row['perplexity']:.2f}", change)
    out.print(table)


def generate(
    model_dir: Annotated[
        Path, typer.Argument(help="A saved model, a run directory (its best checkpoint) or an application.")
    ],
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    max_new_tokens: MaxNewTokensOption = 64,
    temperature: TemperatureOption = 0.8,
    top_p: TopPOption = 0.95,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    explain: Annotated[
        bool, typer.Option("--explain", help="Then list each generated token's top and routed modules.")
    ] = False,
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Decode through torch.compile: the same tokens up to float rounding; the first call "
            "compiles (minutes). For GPUs: on a CPU it measured slower than eager (README).",
        ),
    ] = False,
) -> None:
    """Continue a prompt with a saved model (KV-cached, modules included)."""
    import torch

    from ..application import load_application
    from ..backbone import context_length
    from ..decoding import compiled_decoding
    from ..explain import require_modules
    from ..padding import pad_id

    _quiet_transformers()
    model, tokenizer = load_application(model_dir)  # a fine-tuned application too
    if explain:
        require_modules(model)
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise DharmaError("the prompt is empty", hint="Give some text to continue.")
    ids = _fit_prompt(ids, max_new_tokens, context_length(model.config.text_config))
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    decoding = compiled_decoding(model) if compile_ else contextlib.nullcontext()
    with torch.no_grad(), decoding:
        result = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id(tokenizer),
            **sampling,
        )
    typer.echo(prompt + tokenizer.decode(result[0, ids.shape[1] :], skip_special_tokens=True))
    if explain:
        from ..explain import explain_generated

        # One forward over prompt + generation without the cache: each generated token's scores
        # with everything before it as context, as the table of `dharma explain` would give.
        context = context_length(model.config.text_config, default=0) or None
        explanation = explain_generated(model, tokenizer, result[0].tolist(), ids.shape[1], context=context)
        print_table(explanation, model)


def _fit_prompt(ids, max_new_tokens: int, context: int):
    """The latest prompt tokens that leave room for ``max_new_tokens`` in the model's ``context``
    positions (said on stderr when some are left out); a DharmaError when none would."""
    room = context - max_new_tokens
    if room < 1:
        raise DharmaError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the prompt: "
            f"the model has {context} positions",
            hint=f"Use --max-new-tokens {context - 1} or less.",
        )
    if ids.shape[1] > room:
        warn(
            f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} the model's "
            f"{context} positions hold only its last {room}: the model continues from those"
        )
        ids = ids[:, -room:]
    return ids
