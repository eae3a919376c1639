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
