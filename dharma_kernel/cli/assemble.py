"""``dharma validate``, ``dharma assemble`` and ``dharma plan``: the model a manifest describes,
checked on the meta device, built and saved, or its training memory estimated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from .options import FreezeOption, JsonOption, QuietOption
from .output import _quiet_transformers, out, warn


def validate(
    manifest: Annotated[Path, typer.Argument(help="The manifest TOML file.")],
    freeze: FreezeOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Check a manifest and every plugin it needs; build on the meta device and print parameter counts."""
    from ..assemble import build_on_meta, plan_manifest
    from ..freeze import freeze_groups

    _quiet_transformers()
    resolved, plan = plan_manifest(manifest)
    model = build_on_meta(plan)
    freeze_groups(model, [*resolved.freeze.groups, *(freeze or [])])
    _report(model, plan, as_json)
    if not as_json:
        out.print(f"{manifest}: ok (no weights allocated)")
        _note_run_modules(resolved, plan)


def _note_run_modules(resolved: Any, plan: Any) -> None:
    """Say so when the manifest's run directory holds a run trained with other modules."""
    from ..module_set import run_change_line
    from ..train.rundir import RunDir

    root = resolved.resolve_path(resolved.train.output)
    now = [spec["ref"] for spec in plan.config.layout["modules"]]
    line = run_change_line(Path(root), RunDir(Path(root)).link("latest"), now)
    if line:
        warn(line)


def assemble(
    manifest: Annotated[Path, typer.Argument(help="The manifest TOML file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model directory to write.")],
    freeze: FreezeOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Build the model a manifest describes and save it as a Hugging Face directory."""
    from ..assemble import build, build_on_meta, load_tokenizer, plan_manifest
    from ..checkpoint import save
    from ..freeze import freeze_groups

    _quiet_transformers()
    resolved, plan = plan_manifest(manifest)
    groups = list(dict.fromkeys([*resolved.freeze.groups, *(freeze or [])]))
    freeze_groups(build_on_meta(plan), groups)  # a bad group fails before any weights exist
    plan.config.manifest["freeze"] = {"groups": groups}
    tokenizer = load_tokenizer(resolved)
    model = build(plan, seed=resolved.train.seed)
    freeze_groups(model, groups)
    target = save(model, output, tokenizer)
    _report(model, plan, as_json)
    if not as_json:
        note = (
            "with its tokenizer"
            if tokenizer is not None
            else "without a tokenizer: fresh backbone, none given"
        )
        out.print(f"saved {target}, {note}")


def _report(model: Any, plan: Any, as_json: bool) -> None:
    from ..freeze import parameter_table

    rows = parameter_table(model)
    if as_json:
        typer.echo(json.dumps([row.__dict__ for row in rows], indent=2))
        return
    from rich.table import Table

    layout = plan.config.layout
    source = plan.pretrained or f"fresh {plan.config.text_config.model_type}"
    out.print(
        f"backbone: {source}, {plan.config.text_config.num_hidden_layers} layers, "
        f"hidden {plan.config.text_config.hidden_size}"
    )
    out.print(
        f"modules: {len(layout['modules'])} at layers {layout['at_layers']}, {layout['composition']}"
        + (f" top_k {layout['top_k']}" if layout["composition"] == "routed" else "")
        + (f", capacity {layout['capacity_factor']}" if layout.get("capacity_factor") else "")
        + f", preset {layout['preset']}; heads: {', '.join(h['plugin'] for h in layout['heads']) or 'none'}"
    )
    total = rows[-1].parameters
    table = Table("group", "parameters", "share", "trainable", box=None)
    for row in rows:
        share = f"{100 * row.parameters / total:.2f}%" if total else "-"
        table.add_row(row.group, f"{row.parameters:,}", share, f"{row.trainable:,}")
    out.print(table)


def plan_command(
    manifest: Annotated[Path, typer.Argument(help="The manifest TOML file.")],
    memory: Annotated[str, typer.Option("--memory", help="Memory to fit in: 4GiB, 512MiB, 4GB or bytes.")],
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Sequences (default: train.batch_size).")
    ] = None,
    length: Annotated[
        int | None, typer.Option("--length", min=1, help="Tokens per sequence (default: data.max_length).")
    ] = None,
    freeze: FreezeOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Estimate a training step's peak memory and list the memory settings that fit; no weights allocated."""
    from rich.table import Table

    from ..assemble import build_on_meta, plan_manifest
    from ..freeze import freeze_groups
    from ..train.memory import MemorySettings, changes, estimate, fitting_settings, gib, parse_size

    budget = parse_size(memory, "--memory")
    _quiet_transformers()
    resolved, plan = plan_manifest(manifest)
    model = build_on_meta(plan)
    freeze_groups(model, [*resolved.freeze.groups, *(freeze or [])])
    batch, length = batch_size or resolved.train.batch_size, length or resolved.data.max_length
    own = MemorySettings.from_train(resolved.train)
    mine = estimate(model, batch, length, own)
    accum = resolved.train.grad_accum
    fits = fitting_settings(model, budget, batch, length, own, accum)
    if as_json:
        result = {
            "manifest": str(manifest), "batch_size": batch, "length": length, "settings": own.__dict__,
            "bytes": dict(mine.parts()), "total": mine.total, "budget": budget, "fits": mine.total <= budget,
            "fitting": [{"changes": changes(f.settings, own, accum), "total": f.total} for f in fits],
        }  # fmt: skip
        typer.echo(json.dumps(result, indent=2))
        return
    switches = ", ".join(f"{name} {str(value).lower()}" for name, value in own.__dict__.items())
    auto = " (counted as fp32)" if own.precision == "auto" else ""
    out.print(f"{manifest}: batch {batch} x {length} tokens; {switches}{auto}")
    table = Table("part", "GiB", "bytes", box=None)
    for name, value in mine.parts():
        table.add_row(name, gib(value), f"{value:,}")
    out.print(table)
    verdict = "fits" if mine.total <= budget else f"does not fit, {gib(mine.total - budget)} GiB over"
    out.print(f"budget {gib(budget)} GiB ({budget:,} bytes): {verdict}")
    if not fits:
        least = min(fitting_settings(model, 2**63, batch, length, own, accum), key=lambda e: e.total)
        out.print(
            f"no settings fit: the least memory is {gib(least.total)} GiB, with "
            f"{', '.join(changes(least.settings, own, accum)) or 'these settings'}; lower --batch-size or "
            "--length, or freeze more groups"
        )
        return
    table = Table(escape("changes to [train]"), "total GiB", box=None)
    for fit in fits:
        table.add_row(", ".join(changes(fit.settings, own, accum)) or "none", gib(fit.total))
    out.print("settings that fit, fewest changes first:")
    out.print(table)
    if any(f.settings.optimizer_in_backward for f in fits):
        note = "optimizer_in_backward clips each parameter's gradient on its own and needs grad_accum = 1"
        if accum > 1:
            sequences = f"{batch} sequence{'s' if batch > 1 else ''}"
            note += (
                f": a step then trains on {sequences} instead of {batch * accum}; to keep {batch * accum}, "
                f"plan again with --batch-size {batch * accum}"
            )
        out.print(note)
