"""Health: distress about illness, pain and the body."""

from dharma_kernel.families import CrisisModule


class Health(CrisisModule):
    name = "health"
    module_api = "1.0"
    concepts = (
        "आरोग्य", "रोग", "व्याधि",
        "ārogya", "roga", "vyādhi",
        "illness", "disease", "pain", "diagnosis", "recovery", "surgery",
    )  # fmt: skip
