"""Varna: one's nature and vocation, read as aptitude rather than birth."""

from dharma_kernel.families import LifeModule


class Varna(LifeModule):
    name = "varna"
    module_api = "1.0"
    concepts = (
        "वर्ण", "स्वभाव", "गुण",
        "varṇa", "svabhāva", "guṇa",
        "vocation", "calling", "temperament", "aptitude",
    )  # fmt: skip
