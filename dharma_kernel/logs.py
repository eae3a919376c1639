"""Logging: kernel code logs to ``logging.getLogger(__name__)``; the CLI shows it on stderr.

:func:`setup_logging` (called by ``dharma``'s ``main``) gives the ``dharma_kernel``
logger one rich handler on stderr, so stdout carries only results (tables, JSON).
A record prints as one line: ``warning: <message>`` for warnings and errors, the bare
message for progress (info). ``--quiet`` raises the level to warnings.
"""

from __future__ import annotations

import logging
import os

from rich.console import Console, ConsoleRenderable
from rich.highlighter import NullHighlighter
from rich.logging import RichHandler
from rich.text import Text

ROOT = "dharma_kernel"


class _LineHandler(RichHandler):
    """rich's handler without its time/level/path columns: a log line reads like the CLI's other lines."""

    def render(self, *, record: logging.LogRecord, traceback: object, message_renderable: ConsoleRenderable):
        if record.levelno < logging.WARNING:
            return message_renderable
        style = "yellow" if record.levelno < logging.ERROR else "bold red"
        prefix = Text(f"{record.levelname.lower()}: ", style=style)
        return Text.assemble(prefix, message_renderable) if isinstance(message_renderable, Text) else prefix


def setup_logging(console: Console | None = None, level: int = logging.INFO) -> logging.Logger:
    """Route the kernel's log records to ``console`` (stderr by default); safe to call again."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _LineHandler)]:
        logger.removeHandler(handler)
    handler = _LineHandler(
        console=console or Console(stderr=True, highlight=False, soft_wrap=True, color_system=_styles()),
        show_time=False,
        show_level=False,
        show_path=False,
        markup=False,
        highlighter=NullHighlighter(),
    )
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # the root logger's handlers (pytest's, an app's) would print it twice
    return logger


def _styles() -> str | None:
    return None if os.environ.get("NO_COLOR") else "auto"  # NO_COLOR: no escape codes at all


def set_level(level: int) -> None:
    logging.getLogger(ROOT).setLevel(level)
