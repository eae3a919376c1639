"""Corpus chrF and BLEU, on sacrebleu's 0-100 scale (the scale published scores use)."""

from __future__ import annotations

from collections.abc import Sequence


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``chrf`` (character 6-grams, beta 2) and ``bleu`` (13a tokens, up to 4-grams) over the corpus."""
    from sacrebleu.metrics import BLEU, CHRF

    hypotheses, references = list(hypotheses), [list(references)]
    return {
        "chrf": float(CHRF().corpus_score(hypotheses, references).score),
        "bleu": float(BLEU().corpus_score(hypotheses, references).score),
    }
