"""Moksha: the path toward liberation from the cycle of birth and bondage."""

from dharma_kernel.families import PathModule


class Moksha(PathModule):
    name = "moksha"
    module_api = "1.0"
    concepts = (
        "मोक्ष", "मुक्ति", "कैवल्य",
        "mokṣa", "mukti", "kaivalya",
        "liberation", "release", "freedom from rebirth", "bondage",
    )  # fmt: skip
