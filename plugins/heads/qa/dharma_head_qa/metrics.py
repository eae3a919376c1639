"""Exact match and token F1 between a predicted answer and its gold answers (SQuAD-style).

Both sides are normalised first: lower case, punctuation removed, the English articles
"a", "an" and "the" removed, whitespace collapsed. Punctuation is every Unicode character
whose category starts with "P", so a danda (।) goes but Devanagari vowel signs and IAST
diacritics stay. With several gold answers a prediction gets its best score among them.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["exact_match", "normalize_answer", "qa_scores", "token_f1"]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1(prediction: str, gold: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not wanted:
        # an answer that normalises to nothing (only "the", say) matches only another such answer
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the prediction equals any gold answer after normalisation, else 0.0."""
    return max((_exact(prediction, gold) for gold in golds), default=0.0)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """The harmonic mean of token precision and recall, against the best-matching gold answer."""
    return max((_f1(prediction, gold) for gold in golds), default=0.0)


def qa_scores(pairs: Iterable[tuple[str, Sequence[str]]]) -> dict[str, float]:
    """Mean ``exact_match`` and ``f1`` (in [0, 1]) over (prediction, golds) pairs, and their ``count``."""
    pairs = list(pairs)
    if not pairs:
        return {"exact_match": 0.0, "f1": 0.0, "count": 0}
    em = sum(exact_match(p, g) for p, g in pairs) / len(pairs)
    f1 = sum(token_f1(p, g) for p, g in pairs) / len(pairs)
    return {"exact_match": em, "f1": f1, "count": len(pairs)}
