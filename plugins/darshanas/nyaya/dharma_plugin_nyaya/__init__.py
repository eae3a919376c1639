"""Nyaya: logic and the means of valid knowledge."""

from dharma_kernel.families import DarshanaModule


class Nyaya(DarshanaModule):
    name = "nyaya"
    module_api = "1.0"
    concepts = (
        "न्याय", "प्रमाण", "तर्क", "अनुमान",
        "nyāya", "pramāṇa", "tarka", "anumāna",
        "logic", "valid knowledge", "inference", "reasoning",
    )  # fmt: skip
