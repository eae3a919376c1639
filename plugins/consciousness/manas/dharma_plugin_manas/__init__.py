"""Manas: the thinking, sense-bound mind."""

from dharma_kernel.families import ConsciousnessModule


class Manas(ConsciousnessModule):
    name = "manas"
    module_api = "1.0"
    concepts = (
        "मनस्", "मन", "इन्द्रिय",
        "manas", "manaḥ", "indriya",
        "mind", "thinking mind", "the senses", "restless mind",
    )  # fmt: skip
