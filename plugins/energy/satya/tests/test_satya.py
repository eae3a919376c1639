from dharma_plugin_satya import Satya

from dharma_kernel.testing import ModuleConformance


class TestSatyaConformance(ModuleConformance):
    plugin = Satya
