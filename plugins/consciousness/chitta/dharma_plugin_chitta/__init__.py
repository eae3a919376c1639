"""Chitta: the mind-stuff that holds impressions."""

from dharma_kernel.families import ConsciousnessModule


class Chitta(ConsciousnessModule):
    name = "chitta"
    module_api = "1.0"
    concepts = (
        "चित्त", "संस्कार", "वृत्ति",
        "citta", "saṃskāra", "vṛtti",
        "mind-stuff", "impressions", "mental modifications", "conditioning",
    )  # fmt: skip
