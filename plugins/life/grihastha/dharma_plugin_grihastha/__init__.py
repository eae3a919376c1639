"""Grihastha: the householder's stage of life."""

from dharma_kernel.families import LifeModule


class Grihastha(LifeModule):
    name = "grihastha"
    module_api = "1.0"
    concepts = (
        "गृहस्थ", "कुटुम्ब", "विवाह",
        "gṛhastha", "kuṭumba", "vivāha",
        "householder", "family life", "marriage", "household",
    )  # fmt: skip
