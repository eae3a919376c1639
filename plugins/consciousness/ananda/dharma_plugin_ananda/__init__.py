"""Ananda: bliss and deep contentment."""

from dharma_kernel.families import ConsciousnessModule


class Ananda(ConsciousnessModule):
    name = "ananda"
    module_api = "1.0"
    concepts = (
        "आनन्द", "सुख",
        "ānanda", "sukha",
        "bliss", "joy", "delight", "contentment",
    )  # fmt: skip
