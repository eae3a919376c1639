"""Bhakti: the path of devotion and loving surrender."""

from dharma_kernel.families import PathModule


class Bhakti(PathModule):
    name = "bhakti"
    module_api = "1.0"
    concepts = (
        "भक्ति", "शरणागति", "ईश्वर",
        "bhakti", "śaraṇāgati", "īśvara",
        "devotion", "loving surrender", "worship", "devotee",
    )  # fmt: skip
