"""Seva: the path of selfless service."""

from dharma_kernel.families import PathModule


class Seva(PathModule):
    name = "seva"
    module_api = "1.0"
    concepts = (
        "सेवा", "दान", "परोपकार",
        "sevā", "dāna", "paropakāra",
        "service", "selfless service", "charity", "helping others",
    )  # fmt: skip
