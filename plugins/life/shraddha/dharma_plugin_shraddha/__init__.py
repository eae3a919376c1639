"""Shraddha: faith and trust."""

from dharma_kernel.families import LifeModule


class Shraddha(LifeModule):
    name = "shraddha"
    module_api = "1.0"
    concepts = (
        "श्रद्धा", "विश्वास",
        "śraddhā", "viśvāsa",
        "faith", "trust", "conviction", "confidence",
    )  # fmt: skip
