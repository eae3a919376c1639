"""Dhyana: meditation, sustained attention."""

from dharma_kernel.families import ConsciousnessModule


class Dhyana(ConsciousnessModule):
    name = "dhyana"
    module_api = "1.0"
    concepts = (
        "ध्यान", "एकाग्रता", "समाधि",
        "dhyāna", "ekāgratā", "samādhi",
        "meditation", "concentration", "absorption", "stillness",
    )  # fmt: skip
