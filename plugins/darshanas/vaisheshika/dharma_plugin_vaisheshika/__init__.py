"""Vaisheshika: atoms, substances and the categories of what exists."""

from dharma_kernel.families import DarshanaModule


class Vaisheshika(DarshanaModule):
    name = "vaisheshika"
    module_api = "1.0"
    concepts = (
        "वैशेषिक", "परमाणु", "द्रव्य", "पदार्थ",
        "vaiśeṣika", "paramāṇu", "dravya", "padārtha",
        "atoms", "substance", "categories of reality", "Kanada",
    )  # fmt: skip
