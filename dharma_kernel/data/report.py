"""What reading and cleaning did to the data: counts, and every problem with its file and record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import DharmaError

__all__ = ["CHAT_DROP_REASONS", "DROP_REASONS", "DataReport", "problem_line"]

DROP_REASONS = ("empty", "too_short", "duplicate", "malformed")
CHAT_DROP_REASONS = ("too_long", "control_token")  # conversations dropped when packed
SHOWN = 5  # problems listed by name; the count says how many there are


def problem_line(source: str, index: int, reason: str) -> str:
    """``file:record: reason``; index 0 means the whole file."""
    return f"{source}:{index}: {reason}" if index else f"{source}: {reason}"


@dataclass
class DataReport:
    """Counts for one run over the data; ``records_read == records_kept + sum(dropped)`` once cleaned.

    files_read: files a reader read. files_skipped: files no reader knows, or that could
    not be read at all (each is also a problem, with record number 0).
    problems: ``(source, index, reason)`` for every skipped file and malformed record.
    strict: a malformed file or record raises :class:`DharmaError` instead of being skipped.
    conversations: conversation records packed (train and eval); conversations_truncated:
    those that lost their oldest exchanges to fit ``max_length``; conversations_cut: those
    whose last exchange alone was longer, cut at ``max_length``; conversations_dropped:
    those left out, by reason (see :func:`~dharma_kernel.data.chat.pack_conversations`).
    """

    files_read: int = 0
    files_skipped: int = 0
    records_read: int = 0
    records_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    problems: list[tuple[str, int, str]] = field(default_factory=list)
    strict: bool = False
    conversations: int = 0
    conversations_truncated: int = 0
    conversations_cut: int = 0
    conversations_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHAT_DROP_REASONS, 0))

    def malformed(self, source: str, index: int, reason: str) -> None:
        """A record a reader could not use: skip and count it, or raise when strict."""
        self._fail(source, index, reason)
        self.records_read += 1
        self.dropped["malformed"] += 1

    def bad_file(self, source: str, reason: str) -> None:
        """A file that could not be read at all: skip and count it, or raise when strict."""
        self._fail(source, 0, reason)
        self.files_skipped += 1

    def unknown_file(self, source: str, reason: str) -> None:
        """A file no reader knows; skipped even when strict, since directories hold such files."""
        self.problems.append((source, 0, reason))
        self.files_skipped += 1

    def _fail(self, source: str, index: int, reason: str) -> None:
        if self.strict:
            raise DharmaError(
                problem_line(source, index, reason), hint="fix it, or leave out --strict to skip it"
            )
        self.problems.append((source, index, reason))

    def first_problems(self, shown: int = SHOWN) -> list[str]:
        """The first ``shown`` problems as ``file:record: reason``, then how many more there are."""
        lines = [problem_line(*problem) for problem in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(f"and {len(self.problems) - shown} more")
        return lines

    def problems_summary(self) -> str:
        """How many files and records were skipped, and the first few with file, record and reason;
        empty when there were none."""
        if not self.problems:
            return ""
        listed = "\n".join(f"  {line}" for line in self.first_problems())
        return f"skipped {len(self.problems)} (file:record: reason; --strict stops at the first):\n{listed}"

    def as_json(self) -> dict[str, Any]:
        """The counts, and every problem as ``file:record: reason`` (``--json`` output)."""
        values = {k: v for k, v in asdict(self).items() if k != "strict"}
        values["problems"] = [problem_line(*problem) for problem in self.problems]
        return values

    def summary(self) -> str:
        """A few lines of numbers."""
        dropped = ", ".join(f"{self.dropped[reason]} {reason}" for reason in DROP_REASONS)
        lines = (
            f"files: {self.files_read} read, {self.files_skipped} skipped\n"
            f"records: {self.records_read} read, {self.records_kept} kept\n"
            f"dropped: {dropped}"
        )
        if self.conversations:
            left_out = ", ".join(f"{self.conversations_dropped[r]} {r}" for r in CHAT_DROP_REASONS)
            lines += (
                f"\nconversations: {self.conversations} (loss on assistant turns only); "
                f"{self.conversations_truncated} kept only their latest turns, "
                f"{self.conversations_cut} cut at max_length; dropped: {left_out}"
            )
        return lines
