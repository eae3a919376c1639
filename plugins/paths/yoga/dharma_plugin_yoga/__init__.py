"""Yoga (path): union through disciplined, even-minded action; several attention views."""

from dharma_kernel.families import MultiViewPathModule


class Yoga(MultiViewPathModule):
    name = "yoga"
    module_api = "1.0"
    concepts = (
        "योग", "समत्व", "युक्त",
        "yoga", "samatva", "yukta", "yogī",
        "union", "equanimity", "skill in action", "yogi",
    )  # fmt: skip
