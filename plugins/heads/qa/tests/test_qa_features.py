"""Answers found in tokens and mapped back to exactly their characters, in every script we use."""

import pytest
from dharma_head_qa.features import answer_tokens, char_span, encode_record, windows
from dharma_head_qa.records import parse_record

from dharma_kernel.data.tokenizer import train_tokenizer
from dharma_kernel.protocol import RecordError

TEXTS = [
    "धर्मक्षेत्रे कुरुक्षेत्रे समवेता युयुत्सवः । मामकाः पाण्डवाश्चैव किमकुर्वत सञ्जय ॥",
    "dharmakṣetre kurukṣetre samavetā yuyutsavaḥ, māmakāḥ pāṇḍavāś caiva kim akurvata sañjaya",
    "Krishna taught Arjuna on the field of Kurukshetra, before the battle began.",
]


@pytest.fixture(scope="module", params=[False, True], ids=["untrimmed", "trimmed"])
def tokenizer(request):
    """Ours (offsets include a token's leading space) and GPT-2's pretrained kind (trimmed)."""
    from tokenizers import processors

    # small on purpose: few merges, so Devanagari letters are split over byte tokens
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300)
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=request.param)
    return tokenizer


def _offsets(tokenizer, text):
    return [
        tuple(s)
        for s in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ]


@pytest.mark.parametrize("text", TEXTS)
def test_every_word_maps_to_tokens_and_back_to_itself(tokenizer, text):
    offsets = _offsets(tokenizer, text)
    start = 0
    for word in text.split():
        start = text.index(word, start)
        first, last = answer_tokens(offsets, start, start + len(word))
        assert char_span(text, offsets, first, last) == (start, start + len(word)), word
        start += len(word)


def test_multi_word_answer_in_devanagari(tokenizer):
    text = TEXTS[0]
    answer = "कुरुक्षेत्रे समवेता"
    start = text.index(answer)
    offsets = _offsets(tokenizer, text)
    first, last = answer_tokens(offsets, start, start + len(answer))
    s, e = char_span(text, offsets, first, last)
    assert text[s:e] == answer


def test_windows_cover_the_sequence_with_the_stated_overlap():
    assert windows(10, 16, 4) == [(0, 10)]
    spans = windows(30, 12, 4)
    assert spans == [(0, 12), (8, 20), (16, 28), (24, 30)]
    assert all(b - a <= 12 for a, b in spans)


def _record(context, answer):
    return parse_record({"question": "Who taught Arjuna?", "context": context, "answer": answer})


def test_a_long_context_is_cut_into_windows_and_training_keeps_those_holding_the_answer(tokenizer):
    context = " ".join(TEXTS[2] for _ in range(6))
    start = context.index("Arjuna", len(context) // 2)
    record = _record(context, {"text": "Arjuna", "start": start})
    question_length = len(encode_record(record, tokenizer, 1000, 64, 8)[0].input_ids) - len(
        _offsets(tokenizer, context)
    )
    every = encode_record(record, tokenizer, 48, 64, 8)
    assert len(every) > 2 and all(len(w.input_ids) <= 48 for w in every)
    kept = encode_record(record, tokenizer, 48, 64, 8, train=True)
    assert 0 < len(kept) < len(every)
    for window in kept:
        assert window.context_mask[:question_length] == [0] * question_length
        s, e = char_span(context, window.offsets, window.start, window.end)
        assert (s, e) == (start, start + len("Arjuna"))


def test_a_long_question_keeps_its_first_tokens_and_the_separator(tokenizer):
    record = parse_record({"question": "why " * 100, "context": TEXTS[2], "answer": "Arjuna"})
    window = encode_record(record, tokenizer, 80, 16, 8)[0]
    assert window.context_mask[:16] == [0] * 16 and window.context_mask[16] == 1


def test_an_answer_no_window_holds_is_an_error(tokenizer):
    record = _record(TEXTS[2], TEXTS[2][: len(TEXTS[2]) - 1])
    with pytest.raises(RecordError, match="no window of .* holds the whole answer"):
        encode_record(record, tokenizer, 40, 64, 4, train=True)
