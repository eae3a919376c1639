from dharma_plugin_shraddha import Shraddha

from dharma_kernel.testing import ModuleConformance


class TestShraddhaConformance(ModuleConformance):
    plugin = Shraddha
