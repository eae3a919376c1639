"""The unit every reader yields and every later stage (cleaning, packing, labels) consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Record", "render_messages"]


@dataclass(frozen=True)
class Record:
    """One training text and what is known about it.

    text: what the language model trains on.
    tags: concept tags (feed the modules' concept labels).
    source: the file it came from.
    index: its number in that file, from 1 (in a ``.jsonl`` file, its line number).
    messages: the chat turns (``role``, ``content``) when the record is a conversation;
        ``text`` is then their plain rendering (:func:`render_messages`).
    pair: ``(source language, target language)``, e.g. (Sanskrit, English), for translation.
    """

    text: str
    tags: tuple[str, ...] = ()
    source: str = ""
    index: int = 0
    messages: list[dict[str, Any]] | None = None
    pair: tuple[str, str] | None = None

    def at(self, source: str, index: int) -> Record:
        """This record from ``source``, its number ``index`` there. The constructor (every field
        above), at a third of ``dataclasses.replace``'s cost: a reader makes one per record."""
        return Record(self.text, self.tags, source, index, self.messages, self.pair)


def render_messages(messages: list[dict[str, Any]]) -> str:
    """``"User: ...\\nAssistant: ..."``: plain text for LM training until a chat template exists."""
    return "\n".join(f"{str(turn['role']).capitalize()}: {turn['content']}" for turn in messages)
