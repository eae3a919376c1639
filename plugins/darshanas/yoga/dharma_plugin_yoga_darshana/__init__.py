"""Yoga darshana: Patanjali's system of stilling the movements of the mind."""

from dharma_kernel.families import DarshanaModule


class YogaDarshana(DarshanaModule):
    name = "yoga"
    module_api = "1.0"
    concepts = (
        "योगदर्शन", "चित्तवृत्तिनिरोध", "अष्टाङ्ग", "पतञ्जलि",
        "yogadarśana", "cittavṛttinirodha", "aṣṭāṅga", "patañjali",
        "yoga sutras", "eight limbs", "stilling the mind", "Patanjali",
    )  # fmt: skip
