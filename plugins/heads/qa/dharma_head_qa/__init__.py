"""Extractive question answering for Dharma: the answer is a span of the context."""

from .head import QAConfig, QAHead
from .metrics import exact_match, normalize_answer, qa_scores, token_f1

__all__ = ["QAConfig", "QAHead", "exact_match", "normalize_answer", "qa_scores", "token_f1"]
