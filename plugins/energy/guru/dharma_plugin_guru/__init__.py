"""Guru: the teacher and the teaching."""

from dharma_kernel.families import EnergyModule


class Guru(EnergyModule):
    name = "guru"
    module_api = "1.0"
    concepts = (
        "गुरु", "आचार्य", "उपदेश",
        "guru", "ācārya", "upadeśa",
        "teacher", "guide", "mentor", "teaching",
    )  # fmt: skip
