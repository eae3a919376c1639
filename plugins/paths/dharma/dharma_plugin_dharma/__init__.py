"""Dharma: the path of duty and right order; acts where it detects them."""

from dharma_kernel.families import PathModule


class Dharma(PathModule):
    name = "dharma"
    module_api = "1.0"
    concepts = (
        "धर्म", "स्वधर्म", "ऋत", "कर्तव्य",
        "dharma", "svadharma", "ṛta", "kartavya",
        "duty", "righteousness", "right conduct", "cosmic order", "one's own path",
    )  # fmt: skip
