"""Shakti: power, energy and vitality."""

from dharma_kernel.families import EnergyModule


class Shakti(EnergyModule):
    name = "shakti"
    module_api = "1.0"
    concepts = (
        "शक्ति", "ऊर्जा", "प्राण",
        "śakti", "ūrjā", "prāṇa",
        "power", "energy", "strength", "vitality", "life force",
    )  # fmt: skip
