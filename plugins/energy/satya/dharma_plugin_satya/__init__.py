"""Satya: truth and truthfulness."""

from dharma_kernel.families import EnergyModule


class Satya(EnergyModule):
    name = "satya"
    module_api = "1.0"
    concepts = (
        "सत्य", "सत्यम्",
        "satya", "satyam", "satyavāk",
        "truth", "truthfulness", "honesty", "integrity",
    )  # fmt: skip
