import pytest
from dharma_head_classification import Classification

from dharma_kernel.protocol import RecordError
from dharma_kernel.testing import HeadConformance

RECORDS = [
    {"text": "Karma is action and its fruit.", "label": "karma"},
    {"text": "Bhakti is loving devotion to the divine, sung and lived.", "label": "bhakti"},
    {"text": "Jnana asks who knows.", "label": "jnana"},
    {"text": "Selfless work, offered without grasping.", "label": "karma"},
]


class TestClassificationConformance(HeadConformance):
    plugin = Classification
    config = {"labels": ["bhakti", "jnana", "karma"]}
    records = RECORDS


class TestMeanPooling(HeadConformance):
    plugin = Classification
    config = {"labels": ["bhakti", "jnana", "karma"], "pooling": "mean", "weights": [1.0, 2.0, 0.5]}
    records = RECORDS


def test_fit_config_learns_sorted_labels_and_balanced_weights():
    records = [{"text": "t", "label": label} for label in ["seva", "karma", "karma", "karma", 7]]
    fitted = Classification.fit_config(Classification.Config(class_weights="balanced"), records)
    assert fitted.labels == ["7", "karma", "seva"]
    assert fitted.weights == pytest.approx([5 / 3, 5 / 9, 5 / 3])  # n / (classes * count)
    assert Classification.fit_config(Classification.Config(), records).weights == []
    with pytest.raises(RecordError, match="only the label 'karma'"):
        Classification.fit_config(Classification.Config(), records[1:4])


def test_labels_set_in_the_config_keep_their_order_and_refuse_others():
    records = [{"text": "t", "label": label} for label in ["seva", "karma", "karma"]]
    given = Classification.Config(labels=["seva", "karma", "bhakti"])
    assert Classification.fit_config(given, records).labels == ["seva", "karma", "bhakti"]
    with pytest.raises(RecordError, match="'seva' is not one of the configured labels"):
        Classification.fit_config(Classification.Config(labels=["karma", "bhakti"]), records)
