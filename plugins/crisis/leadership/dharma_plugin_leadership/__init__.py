"""Leadership: the weight of leading people and deciding for them."""

from dharma_kernel.families import CrisisModule


class Leadership(CrisisModule):
    name = "leadership"
    module_api = "1.0"
    concepts = (
        "नेतृत्व", "नायक", "राजधर्म",
        "netṛtva", "nāyaka", "rājadharma",
        "leadership", "leader", "my team", "responsibility", "managing people",
    )  # fmt: skip
