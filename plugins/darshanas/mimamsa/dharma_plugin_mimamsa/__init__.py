"""Mimamsa: the exegesis of Vedic injunction and ritual action."""

from dharma_kernel.families import DarshanaModule


class Mimamsa(DarshanaModule):
    name = "mimamsa"
    module_api = "1.0"
    concepts = (
        "मीमांसा", "यज्ञ", "विधि", "वेद",
        "mīmāṃsā", "yajña", "vidhi", "veda",
        "ritual", "Vedic injunction", "sacrifice", "exegesis",
    )  # fmt: skip
