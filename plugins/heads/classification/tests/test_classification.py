from dharma_head_classification import Classification

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
