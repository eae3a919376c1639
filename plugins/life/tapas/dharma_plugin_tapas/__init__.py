"""Tapas: austerity, discipline, effort that transforms."""

from dharma_kernel.families import LifeModule


class Tapas(LifeModule):
    name = "tapas"
    module_api = "1.0"
    concepts = (
        "तपस्", "तप", "संयम",
        "tapas", "tapa", "saṃyama",
        "austerity", "discipline", "self-restraint", "perseverance",
    )  # fmt: skip
