"""Karma: the path of action; reads a learned memory of patterns of action."""

from dharma_kernel.families import MemoryPathModule


class Karma(MemoryPathModule):
    name = "karma"
    module_api = "1.0"
    concepts = (
        "कर्म", "कर्मफल", "निष्काम",
        "karma", "karmaphala", "niṣkāma",
        "action", "deed", "fruit of action", "selfless action", "consequences",
    )  # fmt: skip
