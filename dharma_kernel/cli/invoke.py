"""How ``dharma`` runs its typer app: usage mistakes as ``error:`` lines, user paths checked before
any command body runs (so before torch or transformers is imported), and help without type noise.

:func:`invoke` is what :func:`dharma_kernel.cli.main` calls; it applies to every command, the
hook plugins' too. The paths checked are each command's positional ``Path`` arguments (a command
names what it reads by position and what it writes with ``-o``) and the values of ``--data`` and
``--eval`` (files, directories or globs, as the data readers expand them).
"""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Any, NoReturn

import typer
from typer.models import ArgumentInfo, OptionInfo

from ..errors import DharmaError

try:  # typer >= 0.20 vendors click; older releases use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors  # type: ignore[no-redef]

DATA_FLAGS = ("--data", "--eval")  # options whose values are files, directories or globs to read


def invoke(app: typer.Typer, argv: list[str]) -> NoReturn:
    """Run ``app`` on ``argv`` and exit as click's standalone mode does (0, or ``typer.Exit``'s
    code); a usage mistake raises :class:`DharmaError` (exit 2)."""
    _plain_help()
    for info in app.registered_commands:
        if info.callback is not None:
            info.callback = _checking_paths(info.callback)
    try:
        code = app(args=argv, prog_name="dharma", standalone_mode=False)
    except click_errors.NoArgsIsHelpError:
        raise SystemExit(2) from None  # `dharma` alone: the help is printed already, as click does
    except typer.Abort:
        raise KeyboardInterrupt from None
    except click_errors.ClickException as error:
        raise usage_error(error) from None
    raise SystemExit(code if isinstance(code, int) else 0)  # standalone_mode=False returns Exit's code


def usage_error(error: click_errors.ClickException) -> DharmaError:
    """A click usage error (unknown command or option, a missing or bad value) as one ``error:``
    line, with where to look for the right usage as its hint."""
    text = " ".join(error.format_message().split())
    text = (text[:1].lower() + text[1:]).removesuffix(".")
    ctx = getattr(error, "ctx", None)
    hint = f"{ctx.command_path if ctx is not None else 'dharma'} --help shows the usage"
    problem = DharmaError(text, hint=hint)
    problem.exit_code = error.exit_code
    return problem


def _checking_paths(command: Any) -> Any:
    """``command`` that first checks the paths it was given exist (once wrapped, returned as is)."""
    if getattr(command, "_dharma_checks_paths", False):
        return command
    hints = typing.get_type_hints(command, include_extras=True)
    arguments, data = [], []
    for name in inspect.signature(command).parameters:
        kind, info = _declared(hints.get(name))
        if isinstance(info, ArgumentInfo) and kind is Path:
            arguments.append((name, info.help))
        elif isinstance(info, OptionInfo) and _flags(info) & set(DATA_FLAGS):
            data.append(name)
    if not arguments and not data:
        return command

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name, help_text in arguments:
            require_path(kwargs.get(name), help_text)
        for name in data:
            require_data(kwargs.get(name) or [])
        return command(*args, **kwargs)

    checked._dharma_checks_paths = True  # type: ignore[attr-defined]
    return checked


def _declared(hint: Any) -> tuple[Any, Any]:
    """``(type, typer info)`` of an ``Annotated[T, typer.Argument(...)]`` hint; ``T | None`` gives T."""
    if typing.get_origin(hint) is not typing.Annotated:
        return None, None
    kind, *extras = typing.get_args(hint)
    options = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    if len(options) == 1:
        kind = options[0]
    info = next((extra for extra in extras if isinstance(extra, ArgumentInfo | OptionInfo)), None)
    return kind, info


def _flags(info: OptionInfo) -> set[str]:
    """An option's flags; inside ``Annotated``, typer takes ``typer.Option("--data")``'s first as one."""
    first = [info.default] if isinstance(info.default, str) and info.default.startswith("-") else []
    return {*first, *(info.param_decls or ())}


def require_path(path: Path | None, what: str | None = None) -> None:
    """A DharmaError unless ``path`` (when given) exists; ``what`` (the argument's help) is the hint."""
    if path is None or Path(path).exists():
        return
    hint = f"expected {what[:1].lower()}{what[1:]}" if what else None
    raise DharmaError(f"{path}: no such file or directory", hint=hint)


def require_data(paths: list[str]) -> None:
    """A DharmaError naming the first of ``paths`` that is no file, directory or matching glob."""
    from ..data.paths import expand_paths

    expand_paths(paths)


@functools.cache
def _plain_help() -> None:
    """typer 0.29 shows ``<bool>`` beside every flag and a required argument as ``{manifest}``;
    show flags bare and arguments as ``MANIFEST`` (``[TEXT]`` when optional), as click does."""
    from typer import core

    display = getattr(core.TyperOption, "display_type_rich", None)
    if display is not None:

        def display_type_rich(self: Any, ctx: Any) -> str | None:
            return None if self.is_flag and self.metavar is None else display(self, ctx)

        core.TyperOption.display_type_rich = display_type_rich
    if hasattr(core.TyperArgument, "_usage_display_name"):

        def usage_name(self: Any) -> str:
            name = self.metavar or self.name.upper()
            name = name if self.required else f"[{name}]"
            return name if self.nargs == 1 else f"{name}..."

        core.TyperArgument._usage_display_name = usage_name
