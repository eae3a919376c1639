from dharma_head_qa import QAHead

from dharma_kernel.testing import HeadConformance

RECORDS = [
    {
        "question": "Who taught Arjuna?",
        "context": "Krishna taught Arjuna on the field of Kurukshetra.",
        "answer": {"text": "Krishna", "start": 0},
    },
    {
        "question": "Where did Vyasa live?",
        "context": "Vyasa lived in a hermitage on an island in the Yamuna.",
        "answer": {"text": "an island in the Yamuna"},
    },
    {
        "question": "कौन युद्ध के लिए एकत्र हुए?",
        "context": "धर्मक्षेत्रे कुरुक्षेत्रे समवेता युयुत्सवः",
        "answers": [{"text": "युयुत्सवः"}, "समवेता युयुत्सवः"],
    },
]


class TestQAConformance(HeadConformance):
    plugin = QAHead
    records = RECORDS


class TestQAWithoutLookahead(HeadConformance):
    plugin = QAHead
    config = {"lookahead_heads": 0, "max_answer_tokens": 8}
    records = RECORDS
