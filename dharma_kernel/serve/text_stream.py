"""Generated token ids to text deltas: whole characters only, and never past a stop sequence."""

from __future__ import annotations

from typing import Any


class TextStream:
    """``push(token)`` returns the text that token settles. Byte-level BPE can split a character over
    tokens: the pending bytes (U+FFFD) wait for the token that completes them. Text that could be
    the start of a stop sequence waits until it is clearly not one; ``stopped`` is set once a stop
    sequence appears, and nothing from it on is ever returned."""

    def __init__(self, tokenizer: Any, stops: list[str], hidden: frozenset[int] = frozenset()) -> None:
        self.tokenizer, self.stops, self.hidden = tokenizer, stops, hidden
        self.ids: list[int] = []
        self.sent = ""  # text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped or token in self.hidden:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        return self._release(text, final=False)

    def finish(self) -> str:
        """What was held back, once generation has ended."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True), final=True)

    def _release(self, text: str, final: bool) -> str:
        for stop in self.stops:
            at = text.find(stop, max(0, len(self.sent) - len(stop)))
            if at != -1:
                self.stopped = True
                text = text[:at]
        if not self.stopped and not final:
            text = text[: len(text) - self._held(text)]
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that begin some stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
