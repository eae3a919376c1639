"""Wellness: stress, sleep, rest and care of oneself."""

from dharma_kernel.families import CrisisModule


class Wellness(CrisisModule):
    name = "wellness"
    module_api = "1.0"
    concepts = (
        "स्वास्थ्य", "विश्राम", "निद्रा",
        "svāsthya", "viśrāma", "nidrā",
        "wellness", "well-being", "stress", "anxiety", "sleep", "self-care",
    )  # fmt: skip
