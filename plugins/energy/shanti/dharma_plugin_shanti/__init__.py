"""Shanti: peace and calm."""

from dharma_kernel.families import EnergyModule


class Shanti(EnergyModule):
    name = "shanti"
    module_api = "1.0"
    concepts = (
        "शान्ति", "शम", "प्रशान्त",
        "śānti", "śama", "praśānta",
        "peace", "calm", "tranquility", "serenity",
    )  # fmt: skip
