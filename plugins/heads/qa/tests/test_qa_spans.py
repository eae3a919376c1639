"""The best span: highest start + end logit among context spans no longer than the limit."""

import pytest
import torch
from dharma_head_qa.spans import best_span


def test_best_span_respects_order_length_and_the_context_mask():
    start = torch.tensor([9.0, 0.0, 5.0, 0.0, 0.0, 0.0])
    end = torch.tensor([0.0, 8.0, 0.0, 1.0, 0.0, 4.0])
    mask = torch.tensor([0, 1, 1, 1, 1, 1])  # token 0 is the question: its 9.0 must not count
    span = best_span(start, end, mask, max_tokens=10)
    assert (span.first, span.last) == (2, 5)
    # 2..5 (5 + 4) beats 1..1 (0 + 8) but is 4 tokens long; with at most 2, 1..1 wins over 2..3 (5 + 1)
    short = best_span(start, end, mask, max_tokens=2)
    assert (short.first, short.last) == (1, 1)


def test_score_is_the_product_of_start_and_end_probabilities():
    start, end = torch.tensor([0.0, 2.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    mask = torch.tensor([0, 1, 1])
    span = best_span(start, end, mask, max_tokens=5)
    p_start = torch.softmax(torch.tensor([2.0, 1.0]), 0)[0]
    p_end = torch.softmax(torch.tensor([0.0, 3.0]), 0)[1]
    assert (span.first, span.last) == (1, 2)
    assert span.score == pytest.approx(float(p_start * p_end))


def test_no_context_no_span():
    assert best_span(torch.zeros(3), torch.zeros(3), torch.zeros(3), 4) is None
