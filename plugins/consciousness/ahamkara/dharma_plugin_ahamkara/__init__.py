"""Ahamkara: the I-maker, the sense of being a separate doer."""

from dharma_kernel.families import ConsciousnessModule


class Ahamkara(ConsciousnessModule):
    name = "ahamkara"
    module_api = "1.0"
    concepts = (
        "अहंकार", "अहङ्कार", "अभिमान",
        "ahaṃkāra", "ahaṅkāra", "abhimāna",
        "ego", "I-maker", "pride", "sense of I",
    )  # fmt: skip
