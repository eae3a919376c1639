"""Where a command's output goes: results on :data:`out` (stdout), errors and progress on
:data:`err` (stderr), warnings through logging, JSON through :func:`echo_json`.

:func:`fail` prints a :class:`~dharma_kernel.errors.DharmaError` as ``error: <message>`` lines
without a traceback and exits with its code.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import DharmaError

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


def print_summary_json(summary) -> None:
    """``--json`` for train and finetune: the run's summary, paths as strings."""
    echo_json(_jsonable(asdict(summary)))


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(v) for key, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def _quiet_transformers() -> None:
    """The CLI prints its own facts: no progress bars or advisory logs from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
