from dharma_plugin_bhakti import Bhakti

from dharma_kernel.testing import ModuleConformance


class TestBhaktiConformance(ModuleConformance):
    plugin = Bhakti
