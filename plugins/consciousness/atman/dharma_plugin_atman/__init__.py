"""Atman: the self, the witness behind experience."""

from dharma_kernel.families import ConsciousnessModule


class Atman(ConsciousnessModule):
    name = "atman"
    module_api = "1.0"
    concepts = (
        "आत्मन्", "आत्मा", "साक्षी",
        "ātman", "ātmā", "sākṣī",
        "the self", "inner self", "witness", "soul",
    )  # fmt: skip
