"""Exact match and token F1: the SQuAD normalisation and the best of several gold answers."""

import pytest
from dharma_head_qa.metrics import exact_match, normalize_answer, qa_scores, token_f1


def test_normalisation_drops_case_punctuation_articles_and_extra_space():
    assert normalize_answer("  The Bhagavad-Gita,  an epic! ") == "bhagavadgita epic"
    assert normalize_answer("A teacher") == "teacher"
    # articles only as whole words: "theory" and "another" keep their letters
    assert normalize_answer("another theory") == "another theory"


def test_danda_is_punctuation_but_devanagari_signs_and_iast_diacritics_stay():
    assert normalize_answer("धर्मक्षेत्रे ।") == "धर्मक्षेत्रे"
    assert normalize_answer("Kṛṣṇa.") == "kṛṣṇa"
    assert exact_match("kṛṣṇa", ["Krsna"]) == 0.0


def test_exact_match_takes_the_best_gold_answer():
    assert exact_match("the Ganga", ["Yamuna", "Ganga"]) == 1.0
    assert exact_match("Ganga river", ["Yamuna", "Ganga"]) == 0.0
    assert exact_match("anything", []) == 0.0


def test_token_f1_counts_shared_tokens():
    # predicted: sage vyasa wrote (3); gold: vyasa (1); shared 1 -> P 1/3, R 1 -> F1 0.5
    assert token_f1("the sage Vyasa wrote", ["Vyasa"]) == pytest.approx(0.5)
    # repeated tokens count only as often as they occur in both
    assert token_f1("om om om", ["om"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("Arjuna", ["Krishna"]) == 0.0
    assert token_f1("Krishna taught", ["Arjuna", "Krishna taught Arjuna"]) == pytest.approx(0.8)


def test_answers_that_normalise_to_nothing_match_only_each_other():
    assert token_f1("the", ["a"]) == 1.0
    assert token_f1("the", ["Vyasa"]) == 0.0


def test_qa_scores_are_means_over_records():
    scores = qa_scores([("Vyasa", ["Vyasa"]), ("the sage Vyasa wrote", ["Vyasa"]), ("x", ["y"])])
    assert scores["count"] == 3
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert qa_scores([]) == {"exact_match": 0.0, "f1": 0.0, "count": 0}
