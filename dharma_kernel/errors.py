"""The one exception type for mistakes a user can fix."""

from __future__ import annotations


class DharmaError(Exception):
    """A user-caused problem. The message says what is wrong and what to do.

    The CLI prints it without a traceback and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n{hint}")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def error_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"``: enough to say why, without a traceback."""
    return f"{type(err).__name__}: {first_line(err)}"
