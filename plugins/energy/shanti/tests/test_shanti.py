from dharma_plugin_shanti import Shanti

from dharma_kernel.testing import ModuleConformance


class TestShantiConformance(ModuleConformance):
    plugin = Shanti
