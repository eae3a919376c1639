"""QA records: answers located in their contexts, every mistake a clear message."""

import json

import pytest
from dharma_head_qa import QAHead
from dharma_head_qa.records import Answer, parse_record

from dharma_kernel.errors import DharmaError
from dharma_kernel.head_data import read_head_records
from dharma_kernel.protocol import RecordError

CONTEXT = "Vyasa composed the Mahabharata. Ganesha wrote it down."


def test_answer_with_start_and_answers_list():
    record = parse_record({"question": "Who?", "context": CONTEXT, "answer": {"text": "Vyasa", "start": 0}})
    assert record.answers == (Answer("Vyasa", 0),)
    many = parse_record(
        {"question": "Who?", "context": CONTEXT, "answers": [{"text": "Ganesha", "start": 32}, "Vyasa"]}
    )
    assert many.answers == (Answer("Ganesha", 32), Answer("Vyasa", 0))
    assert CONTEXT[many.answers[0].start : many.answers[0].end] == "Ganesha"


def test_missing_start_is_found_when_the_answer_occurs_once():
    record = parse_record({"question": "Who wrote?", "context": CONTEXT, "answer": {"text": "Ganesha"}})
    assert record.answers[0].start == 32


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": " ", "context": CONTEXT, "answer": "Vyasa"}, "'question' is empty"),
        ({"question": "Who?", "context": "", "answer": "Vyasa"}, "'context' is empty"),
        ({"question": "Who?", "context": CONTEXT, "answer": "Valmiki"}, "'Valmiki' is not in its context"),
        ({"question": "Who?", "context": "om om", "answer": "om"}, "occurs 2 times in its context; give"),
        (
            {"question": "Who?", "context": CONTEXT, "answer": {"text": "Vyasa", "start": 3}},
            "the answer 'Vyasa' is not inside its context at start 3 (the context has 'sa co' there)",
        ),
        ({"question": "Who?", "context": CONTEXT, "answer": {"text": "Vyasa", "start": -1}}, "'start'"),
        ({"question": "Who?", "context": CONTEXT, "answer": {"text": ""}}, "non-empty text"),
        ({"question": "Who?", "context": CONTEXT}, "no answer"),
        (
            {"question": 3, "context": CONTEXT, "answer": "Vyasa"},
            "'question' must be a string, it is of type int",
        ),
    ],
)
def test_bad_records_say_what_is_wrong(record, message):
    with pytest.raises(RecordError) as err:
        parse_record(record)
    assert message in str(err.value)


def test_prediction_records_need_no_answer():
    assert parse_record({"question": "Who?", "context": CONTEXT}, need_answer=False).answers == ()


def test_a_file_may_give_answers_for_answer_but_not_neither(tmp_path):
    path = tmp_path / "train.jsonl"
    records = [
        {"question": "Who?", "context": CONTEXT, "answers": ["Vyasa"]},
        {"question": "Who wrote?", "context": CONTEXT, "answer": "Ganesha"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_head_records(QAHead, [path]).records == records  # field_aliases: "answers" for "answer"

    path.write_text(json.dumps({"question": "Who?", "context": CONTEXT}) + "\n")
    with pytest.raises(DharmaError, match=r"train\.jsonl: record 1: no 'answer' field"):
        read_head_records(QAHead, [path])
