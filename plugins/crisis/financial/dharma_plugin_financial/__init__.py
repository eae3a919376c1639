"""Financial: distress about money, debt and livelihood."""

from dharma_kernel.families import CrisisModule


class Financial(CrisisModule):
    name = "financial"
    module_api = "1.0"
    concepts = (
        "धन", "ऋण", "अर्थ",
        "dhana", "ṛṇa", "artha",
        "money", "debt", "loan", "bills", "savings", "bankruptcy",
    )  # fmt: skip
