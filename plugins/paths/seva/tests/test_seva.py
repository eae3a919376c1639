from dharma_plugin_seva import Seva

from dharma_kernel.testing import ModuleConformance


class TestSevaConformance(ModuleConformance):
    plugin = Seva
