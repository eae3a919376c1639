from dharma_plugin_atman import Atman

from dharma_kernel.testing import ModuleConformance


class TestAtmanConformance(ModuleConformance):
    plugin = Atman
