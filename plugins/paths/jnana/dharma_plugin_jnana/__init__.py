"""Jnana: the path of knowledge; reads the text so far through several attention views."""

from dharma_kernel.families import MultiViewPathModule


class Jnana(MultiViewPathModule):
    name = "jnana"
    module_api = "1.0"
    concepts = (
        "ज्ञान", "विवेक", "विद्या",
        "jñāna", "viveka", "vidyā",
        "knowledge", "wisdom", "discernment", "self-inquiry",
    )  # fmt: skip
