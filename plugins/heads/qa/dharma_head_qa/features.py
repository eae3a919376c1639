"""Token windows over a question and its context, with the answer located in tokens.

An input is the question's tokens, then one newline token run, then a window of the
context's tokens: the backbone is causal, so the context comes after the question and
every context token has seen it. The question keeps at most ``max_question_tokens``
tokens, and never more than half of ``max_length``. A context too long for the rest of
``max_length`` is cut into windows that overlap by ``stride`` tokens; a prediction takes
the best span over all windows.
In training, a window that does not hold the whole answer is not used, and a record
whose answer fits in none of its windows is an error (raise ``max_length``).

Offsets are character spans in the context from the fast tokenizer. A byte-level BPE
may split one Devanagari letter over several tokens, which then share that letter's
span, and its tokens may start with the space before a word: an answer's first token is
the first whose span ends after the answer starts, its last the last that starts before
the answer ends, and spans mapped back to characters drop surrounding whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dharma_kernel.protocol import RecordError

from .records import QARecord

__all__ = ["Window", "answer_tokens", "char_span", "encode_record", "windows"]

SEPARATOR = "\n"


@dataclass
class Window:
    """One model input. ``offsets[i]`` is the context character span of token ``i`` (None
    outside the context). ``start``/``end``: the answer's first and last token, when known."""

    input_ids: list[int]
    offsets: list[tuple[int, int] | None]
    start: int | None = None
    end: int | None = None

    @property
    def context_mask(self) -> list[int]:
        return [0 if span is None else 1 for span in self.offsets]


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]


def answer_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The first and last token of the characters ``[start, end)``, or None if no token covers them."""
    first = next((i for i, (a, b) in enumerate(offsets) if b > start and b > a), None)
    last = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < end), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def char_span(context: str, offsets: list[tuple[int, int] | None], first: int, last: int) -> tuple[int, int]:
    """The characters tokens ``first..last`` cover in ``context``, without surrounding whitespace."""
    start, end = offsets[first][0], offsets[last][1]  # type: ignore[index]
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return start, end


def windows(length: int, room: int, stride: int) -> list[tuple[int, int]]:
    """``[a, b)`` token ranges of at most ``room`` tokens covering ``length``, overlapping by ``stride``."""
    if length <= room:
        return [(0, length)]
    step = max(1, room - stride)
    spans, a = [], 0
    while True:
        spans.append((a, min(a + room, length)))
        if a + room >= length:
            return spans
        a += step


def encode_record(
    record: QARecord,
    tokenizer: Any,
    max_length: int,
    max_question_tokens: int,
    stride: int,
    train: bool = False,
) -> list[Window]:
    """The windows for ``record``. With ``train``, only those holding the first answer, labelled."""
    question, _ = _encode(tokenizer, record.question.strip() + SEPARATOR)
    keep = min(max_question_tokens, max_length // 2)  # the context always has half the room
    sep = question[-1:]  # a cut question still ends with the separator
    question = question[: keep - 1] + sep if len(question) > keep else question
    room = max_length - len(question)
    if room < 8:
        raise RecordError(
            f"max_length {max_length} leaves {room} tokens for the context after a {len(question)}-token "
            "question; raise max_length or lower the head's max_question_tokens"
        )
    ids, offsets = _encode(tokenizer, record.context)
    target = None
    if train:
        answer = record.answers[0]
        target = answer_tokens(offsets, answer.start, answer.end)
        if target is None:
            raise RecordError(f"no context token covers the answer {answer.text!r}")
    out = []
    for a, b in windows(len(ids), room, stride):
        window = Window(question + ids[a:b], [None] * len(question) + offsets[a:b])
        if target is not None:
            if not (a <= target[0] and target[1] < b):
                continue  # the answer is cut off in this window: nothing to learn from it
            window.start, window.end = len(question) + target[0] - a, len(question) + target[1] - a
        out.append(window)
    if train and not out:
        first, last = target  # type: ignore[misc]
        raise RecordError(
            f"no window of {room} context tokens (overlapping by {stride}) holds the whole "
            f"answer (context tokens {first}..{last}); raise max_length or the head's stride"
        )
    return out
