"""Vedanta: the darshana of the Upanishads' end, on brahman, the self and appearance."""

from dharma_kernel.families import DarshanaModule


class Vedanta(DarshanaModule):
    name = "vedanta"
    module_api = "1.0"
    concepts = (
        "वेदान्त", "ब्रह्मन्", "ब्रह्म", "आत्मन्", "माया", "उपनिषद्", "अद्वैत",
        "vedānta", "brahman", "ātman", "māyā", "upaniṣad", "advaita",
        "vedanta", "non-duality", "ultimate reality", "the self", "illusion", "upanishad",
    )  # fmt: skip
