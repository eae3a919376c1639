"""Sankalpa: intention and resolve."""

from dharma_kernel.families import ConsciousnessModule


class Sankalpa(ConsciousnessModule):
    name = "sankalpa"
    module_api = "1.0"
    concepts = (
        "सङ्कल्प", "संकल्प", "व्रत",
        "saṅkalpa", "saṃkalpa", "vrata",
        "intention", "resolve", "resolution", "vow",
    )  # fmt: skip
