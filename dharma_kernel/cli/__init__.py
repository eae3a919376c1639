"""The ``dharma`` command line.

To add a command, write a function under ``@app.command()``; its docstring is its
help. Import torch-heavy modules inside the function so ``dharma --help`` stays
fast, and raise :class:`DharmaError` for anything the user can fix: :func:`main`
prints it as ``error: <message>`` without a traceback and exits with its
``exit_code``. Print results with :data:`out`, warnings with :func:`warn`,
progress with ``logging.getLogger(__name__).info`` (stderr, see :mod:`.logs`).

Conventions: a command that prints a table takes ``quiet: QuietOption = False``
and ``as_json: JsonOption = False``. The options act when parsed: ``--quiet``
silences :data:`out` and lets only warnings and errors log; ``--json`` sends
:data:`out` to stderr, so stdout holds only the JSON the command echoes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from .. import plugins, registry
from ..errors import DharmaError
from ..logs import set_level, setup_logging
from ..version import MODULE_API, __version__
from .invoke import invoke

app = typer.Typer(
    name="dharma",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# NO_COLOR (no-color.org): rich alone drops colours but keeps bold; no escape codes at all is plainer.
_styles = None if os.environ.get("NO_COLOR") else "auto"
out = Console(highlight=False, color_system=_styles)
if not out.is_terminal and "COLUMNS" not in os.environ:
    out.width = 10_000  # piped output is for grep and scripts: never cut a ref or a reason at 80 columns
err = Console(stderr=True, highlight=False, soft_wrap=True, color_system=_styles)


log = logging.getLogger(__name__)


def warn(message: str) -> None:
    log.warning(message)


def fail(error: DharmaError) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit with the error's code.

    A message of several problems gives one ``error:`` line each (indented lines are details of the
    line above); a hint follows as one indented ``hint:`` line.
    """
    message, hint = getattr(error, "message", str(error)), getattr(error, "hint", None)
    for line in message.strip().splitlines() or [type(error).__name__]:
        detail = line[:1].isspace()
        err.print(escape(line) if detail else f"[bold red]error:[/] {escape(line)}")
    if hint:
        err.print(f"  hint: {escape(' '.join(hint.split()))}")
    raise SystemExit(error.exit_code)


def interrupted_line(steps: int, latest: Path | None, resume: str) -> str:
    """What a stopped run says: the step it saved, or that it saved none and which checkpoint is latest
    (a step whose evaluation was not finite is not saved)."""
    if latest is not None and latest.name == f"step-{steps:08d}":
        return f"interrupted: saved step {steps} to {latest}; continue with: {resume}"
    kept = f"the latest checkpoint is {latest}" if latest is not None else "no checkpoint was saved"
    return f"interrupted at step {steps}, which was not saved; {kept}; continue with: {resume}"


def echo_json(value: Any, **options: Any) -> None:
    """``value`` as JSON on stdout; a NaN or infinity (a diverged loss) is null, since
    JSON has no such numbers and a bare ``NaN`` breaks every strict parser."""
    typer.echo(json.dumps(_finite(value), allow_nan=False, indent=2, **options))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dharma-kernel {__version__}, MODULE_API {MODULE_API}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print versions and exit."),
    ] = False,
    no_plugin: Annotated[
        list[str] | None,
        typer.Option(
            "--no-plugin",
            metavar="REF",
            help="Do not load this plugin (ref, short name or distribution); repeatable; "
            "accepted before or after any command.",
        ),
    ] = None,
) -> None:
    """Assemble and train causal language models from plugin modules declared in a TOML manifest."""
    registry.disable(no_plugin or [])
    # One process may run several commands (tests, notebooks): each starts loud, on stdout.
    out.quiet, out.file = False, None
    set_level(logging.INFO)


def _quiet(value: bool) -> bool:
    if value:
        out.quiet = True
        set_level(logging.WARNING)
    return value


def _json(value: bool) -> bool:
    if value:
        out.file = sys.stderr  # human lines still show, but stdout stays parseable
    return value


QuietOption = Annotated[
    bool,
    typer.Option("--quiet", "-q", callback=_quiet, help="Print nothing on stdout; only warnings and errors."),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json", callback=_json, help="Print the result as JSON on stdout; other lines go to stderr."
    ),
]


class Kind(StrEnum):
    module = "module"
    head = "head"


@app.command("plugins")
def plugins_command(
    kind: Annotated[Kind | None, typer.Option(help="Only modules or only heads.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Import each plugin to find broken ones.")] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """List installed module and head plugins from their metadata; --check also imports them."""
    infos = registry.discover(kind.value if kind else None, disabled=True)
    timeout = registry.import_timeout()
    # A plugin printing while it imports must not corrupt --json on stdout.
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("always", registry.PluginWarning)
        rows = [_row(info, check, timeout) for info in infos]
    for w in caught:
        if issubclass(w.category, registry.PluginWarning):
            warn(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        what = f"{kind.value} plugins" if kind else "plugins"
        example = "dharma-head-qa" if kind is Kind.head else "dharma-plugin-vedanta"
        out.print(f"No {what} are installed. Install one with: pip install {example}")
        return
    from rich.table import Table

    table = Table("ref", "distribution", "version", "family", "MODULE_API", "status", box=None)
    for row in rows:
        status = "ok" if row["error"] is None else f"[red]{row['status']}: {escape(row['error'])}[/]"
        cells = [row[key] or "-" for key in ("ref", "distribution", "version", "family", "module_api")]
        table.add_row(*map(escape, cells), status)
    out.print(table)
    if kind is not Kind.head:
        _print_families()
    broken = sum(row["status"] == "broken" for row in rows)
    disabled = sum(row["status"] == "disabled" for row in rows)
    note = "" if check else " (metadata only; --check imports each)"
    counts = f"{len(rows)} plugin{'' if len(rows) == 1 else 's'}, {broken} broken"
    out.print(counts + (f", {disabled} disabled" if disabled else "") + note)


def _print_families() -> None:
    """Each family with installed modules: the names ``include`` and ``--freeze`` take as a group."""
    from ..catalogue import FAMILIES

    listed = {family: refs for family, refs in registry.families().items() if refs}
    if not listed:
        return
    out.print("families (include or freeze each by name):")
    width = max(map(len, listed))
    for family, refs in listed.items():
        origin = "" if family in FAMILIES else "  (new family, from plugins)"
        names = ", ".join(ref.split(".", 1)[1] for ref in refs)
        out.print(f"  {family:<{width}}  {escape(names)}{origin}")


def _row(info: registry.PluginInfo, check: bool, timeout: float) -> dict[str, Any]:
    """One plugin as ``--json`` lists it; status is ok, broken (error says why) or disabled."""
    error = info.disabled or info.problem
    if error is None and check:
        error = registry.check(info, timeout)  # a hanging import is abandoned after ``timeout`` s
    status = "disabled" if info.disabled else "ok" if error is None else "broken"
    return {
        "ref": info.ref,
        "name": info.name,
        "kind": info.kind,
        "family": info.family,
        "distribution": info.distribution,
        "version": info.version,
        "module_api": info.module_api,
        "status": status,
        "error": error,
    }


FreezeOption = Annotated[
    list[str] | None,
    typer.Option("--freeze", help="Freeze a group as well: backbone, spiritual, heads, a family or a ref."),
]
# Sampling options of the commands that generate text (generate, chat); each sets its own default.
MaxNewTokensOption = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate.")]
TemperatureOption = Annotated[
    float, typer.Option("--temperature", min=0.0, help="0 picks the likeliest token.")
]
TopPOption = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]


@app.command()
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


@app.command()
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


def _quiet_transformers() -> None:
    """The CLI prints its own facts: no progress bars or advisory logs from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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
        + f", preset {layout['preset']}; heads: {', '.join(h['plugin'] for h in layout['heads']) or 'none'}"
    )
    total = rows[-1].parameters
    table = Table("group", "parameters", "share", "trainable", box=None)
    for row in rows:
        share = f"{100 * row.parameters / total:.2f}%" if total else "-"
        table.add_row(row.group, f"{row.parameters:,}", share, f"{row.trainable:,}")
    out.print(table)


@app.command("plan")
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


# One import line per command module (noqa I001: ruff would merge them into one statement).
from . import report  # noqa: E402, F401, I001  (registers report)
from . import train  # noqa: E402, F401, I001  (registers train, eval, generate on app)
from . import new_plugin  # noqa: E402, F401, I001  (registers new-plugin)
from . import export  # noqa: E402, F401, I001  (registers export on app)
from . import prepare  # noqa: E402, F401, I001  (registers prepare)


@functools.cache  # once per process, however often main() runs
def _add_hook_commands() -> None:
    # Reading metadata is cheap; importing hook modules is not, so only when some exist.
    if not plugins.hook_entry_points():
        return
    plugins.call_hook("dharma_cli_commands", app=app)
    for ep, reason in plugins.failures:
        dist = ep.dist.name if ep.dist else ep.value
        warn(f"hook plugin '{ep.name}' from {dist} is broken: {reason}; reinstall or upgrade {dist}")


def _take_no_plugin(argv: list[str]) -> list[str]:
    """Apply every ``--no-plugin REF`` (before ``--``) and return the rest: hooks load before typer parses."""
    rest, names, args = [], [], iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
        elif arg == "--no-plugin":
            names.append(next(args, ""))
        elif arg.startswith("--no-plugin="):
            names.append(arg.partition("=")[2])
        else:
            rest.append(arg)
    if "" in names:
        raise DharmaError("--no-plugin needs a plugin ref, short name or distribution")
    registry.disable(names, reset=True)
    return rest


def _log_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """A Python warning (ours, a plugin's, a library's) as one ``warning:`` line, not file:line + source."""
    kind = (
        ""
        if category is UserWarning or issubclass(category, registry.PluginWarning)
        else f"{category.__name__}: "
    )
    logging.getLogger("dharma_kernel.warnings").warning(f"{kind}{message}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``dharma`` and ``python -m dharma_kernel``."""
    try:
        setup_logging(err)
        argv = _take_no_plugin(sys.argv[1:] if argv is None else list(argv))
        with warnings.catch_warnings():  # restores Python's own display when the command ends
            warnings.showwarning = _log_warning
            _add_hook_commands()
            invoke(app, argv)  # usage mistakes as error: lines; user paths checked first
    except DharmaError as error:
        fail(error)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


from . import finetune  # noqa: E402, F401, I001  (registers finetune, predict; extends eval)
from . import chat  # noqa: E402, F401, I001  (registers chat)
from . import translate  # noqa: E402, F401, I001  (registers translate)
from . import explain  # noqa: E402, F401, I001  (registers explain)
from . import serve  # noqa: E402, F401, I001  (registers serve)
