"""Kama: desire and pleasure, one of the aims of life."""

from dharma_kernel.families import LifeModule


class Kama(LifeModule):
    name = "kama"
    module_api = "1.0"
    concepts = (
        "काम", "इच्छा", "तृष्णा",
        "kāma", "icchā", "tṛṣṇā",
        "desire", "pleasure", "longing", "craving",
    )  # fmt: skip
