from dharma_head_translation import Translation

from dharma_kernel.testing import HeadConformance


class TestTranslationConformance(HeadConformance):
    plugin = Translation
    config = {"max_new_tokens": 8}
    records = [
        {"source": "धर्मः", "target": "dharma"},
        {"source": "कर्म योगः", "target": "karma yoga"},
        {"source": "शान्तिः शान्तिः", "target": "peace peace"},
    ]
