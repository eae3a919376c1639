"""Smarana: remembrance and recollection."""

from dharma_kernel.families import ConsciousnessModule


class Smarana(ConsciousnessModule):
    name = "smarana"
    module_api = "1.0"
    concepts = (
        "स्मरण", "स्मृति", "जप",
        "smaraṇa", "smṛti", "japa",
        "remembrance", "recollection", "remembering", "repetition of the name",
    )  # fmt: skip
