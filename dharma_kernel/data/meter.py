"""Progress of a data stage in megabytes of text: a live line on a terminal, one line of totals at the end."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["Meter"]

MB = 1e6


class Meter:
    """``with Meter(console, "read and clean", total) as meter: meter.add(nbytes)``.

    On a terminal the line updates at most twice a second with MB done, of how many, and
    MB/s; at the end ``console`` gets ``<stage>: <MB> MB in <s> s (<MB/s> MB/s)<note>``.
    ``console`` None says nothing.
    """

    def __init__(self, console: Any | None, stage: str, total: float | None = None) -> None:
        self.console, self.stage, self.total = console, stage, total
        self.done = 0.0
        self.note = ""
        self._live = console is not None and bool(getattr(console, "is_terminal", False))
        self._started = self._shown = time.perf_counter()

    def __enter__(self) -> Meter:
        return self

    def add(self, nbytes: float) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self._live and now - self._shown >= 0.5:
            self._shown = now
            of = f" of {self.total / MB:.1f}" if self.total else ""
            rate = self.done / MB / max(now - self._started, 1e-9)
            self.console.file.write(f"\r{self.stage}: {self.done / MB:.1f}{of} MB, {rate:.1f} MB/s ")
            self.console.file.flush()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._started

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if self.console is None:
            return
        if self._live:
            self.console.file.write("\r\033[K")
        if kind is None:
            seconds = self.seconds
            rate = self.done / MB / max(seconds, 1e-9)
            self.console.print(
                f"{self.stage}: {self.done / MB:.1f} MB in {seconds:.1f} s ({rate:.1f} MB/s){self.note}",
                highlight=False,
            )
