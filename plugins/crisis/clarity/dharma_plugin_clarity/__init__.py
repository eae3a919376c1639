"""Clarity: confusion, doubt and decisions that will not settle."""

from dharma_kernel.families import CrisisModule


class Clarity(CrisisModule):
    name = "clarity"
    module_api = "1.0"
    concepts = (
        "संशय", "मोह", "भ्रम",
        "saṃśaya", "moha", "bhrama",
        "confusion", "doubt", "indecision", "dilemma", "feel lost",
    )  # fmt: skip
