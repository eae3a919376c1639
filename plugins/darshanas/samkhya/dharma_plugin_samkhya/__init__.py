"""Samkhya: the enumeration of the principles of reality, spirit and matter."""

from dharma_kernel.families import DarshanaModule


class Samkhya(DarshanaModule):
    name = "samkhya"
    module_api = "1.0"
    concepts = (
        "साङ्ख्य", "सांख्य", "पुरुष", "प्रकृति",
        "sāṅkhya", "sāṃkhya", "puruṣa", "prakṛti",
        "enumeration", "spirit and matter", "principles of reality", "Kapila",
    )  # fmt: skip
