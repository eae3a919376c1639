"""The ``dharma`` command line: the typer app, its commands, and :func:`main`.

Each command is a function in the module of its group (:mod:`.train` holds train, eval and
generate); this module registers them on :data:`app` in the order ``dharma --help`` lists them.
To add a command, write the function (its docstring is its help) and register it here. Import
torch-heavy modules inside the function so ``dharma --help`` stays fast, and raise
:class:`DharmaError` for anything the user can fix: :func:`main` prints it as ``error: <message>``
without a traceback and exits with its ``exit_code``. Print results with :data:`.output.out`,
warnings with :func:`.output.warn`, progress with ``logging.getLogger(__name__).info`` (stderr, see
:mod:`dharma_kernel.logs`); a command that prints a table takes the options of :mod:`.options`.

The layers read top-down: this package imports the rest of the kernel, nothing in the kernel
imports it (``python -m dharma_kernel`` and :mod:`dharma_kernel.testing` drive it from above).
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from typing import Annotated, Any

import typer

from .. import plugins, registry
from ..errors import DharmaError
from ..logs import set_level, setup_logging
from ..version import MODULE_API, __version__
from . import (
    assemble,
    chat,
    explain,
    export,
    finetune,
    listing,
    new_plugin,
    prepare,
    report,
    serve,
    train,
    translate,
)
from .invoke import invoke
from .output import err, fail, out, warn

app = typer.Typer(
    name="dharma",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


app.command("plugins")(listing.plugins_command)
app.command()(assemble.validate)
app.command()(assemble.assemble)
app.command("plan")(assemble.plan_command)
app.command()(report.report)
app.command()(train.train)
app.command("eval")(train.eval_command)
app.command()(train.generate)
app.command("new-plugin")(new_plugin.new_plugin)
app.command("export")(export.export_command)
app.command()(prepare.prepare)
app.command()(finetune.finetune)
app.command()(finetune.predict)
app.command()(chat.chat)
app.command()(translate.translate)
app.command()(explain.explain)
app.command()(serve.serve)


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
