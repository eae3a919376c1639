"""Options several commands take, declared once so they read and act the same everywhere.

A command that prints a table takes ``quiet: QuietOption = False`` and ``as_json: JsonOption =
False``. The options act when parsed: ``--quiet`` silences :data:`~.output.out` and lets only
warnings and errors log; ``--json`` sends :data:`~.output.out` to stderr, so stdout holds only the
JSON the command echoes.
"""

from __future__ import annotations

import logging
import sys
from enum import StrEnum
from typing import Annotated

import typer

from ..logs import set_level
from .output import out


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
# The data of the commands that read a manifest's data (train, prepare).
DataOption = Annotated[
    list[str] | None,
    typer.Option("--data", help="Data files, directories or globs (repeatable); replaces the manifest's."),
]
StrictOption = Annotated[
    bool | None,
    typer.Option("--strict/--lenient", help="Stop at a malformed file or record, or skip and count it."),
]
