"""QA records: a question, its context and the answers, checked as they are read.

One JSON object per record::

    {"question": "...", "context": "...", "answer": {"text": "...", "start": 17}}
    {"question": "...", "context": "...", "answers": [{"text": "..."}, "another answer"]}

``start`` is the character offset of the answer in the context. Left out, the answer is
searched for and must occur exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dharma_kernel.protocol import RecordError

__all__ = ["Answer", "QARecord", "parse_record"]


@dataclass(frozen=True)
class Answer:
    text: str
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass(frozen=True)
class QARecord:
    question: str
    context: str
    answers: tuple[Answer, ...] = ()


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        got = "missing" if value is None else f"of type {type(value).__name__}"
        raise RecordError(f"'{key}' must be a string, it is {got}")
    if not value.strip():
        raise RecordError(f"'{key}' is empty; every QA record needs a {key}")
    return value


def _answer(value: Any, context: str) -> Answer:
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict) or not isinstance(value.get("text"), str) or not value["text"].strip():
        raise RecordError('an answer must be {"text": "...", "start": N} with non-empty text')
    text, start = value["text"], value.get("start")
    if start is None:
        found = context.count(text)
        if found != 1:
            problem = "is not in its context" if found == 0 else f"occurs {found} times in its context"
            hint = "" if found == 0 else "; give its character offset as 'start'"
            raise RecordError(f"the answer {text!r} {problem}{hint}")
        return Answer(text, context.index(text))
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise RecordError(f"answer 'start' must be a character offset >= 0, not {start!r}")
    if context[start : start + len(text)] != text:
        found = context[start : start + len(text)]
        raise RecordError(
            f"the answer {text!r} is not inside its context at start {start} "
            f"(the context has {found!r} there); fix 'start' or leave it out to have the answer searched for"
        )
    return Answer(text, start)


def parse_record(obj: Any, need_answer: bool = True) -> QARecord:
    """The record in ``obj``; a RecordError says what is wrong (the kernel adds file and record number)."""
    if not isinstance(obj, dict):
        raise RecordError(f"a QA record must be a JSON object, not {type(obj).__name__}")
    question, context = _text(obj, "question"), _text(obj, "context")
    if "answer" in obj and "answers" in obj:
        raise RecordError("give either 'answer' or 'answers', not both")
    raw = obj.get("answers", [obj["answer"]] if "answer" in obj else [])
    if not isinstance(raw, list):
        raise RecordError("'answers' must be a list of answers")
    answers = tuple(_answer(value, context) for value in raw)
    if need_answer and not answers:
        raise RecordError('no answer; give \'answer\': {"text": ..., "start": ...}')
    return QARecord(question, context, answers)
