"""Ahimsa: the path of non-harming."""

from dharma_kernel.families import PathModule


class Ahimsa(PathModule):
    name = "ahimsa"
    module_api = "1.0"
    concepts = (
        "अहिंसा", "करुणा",
        "ahiṃsā", "karuṇā",
        "non-violence", "non-harming", "harmlessness", "compassion",
    )  # fmt: skip
