from dharma_plugin_kama import Kama

from dharma_kernel.testing import ModuleConformance


class TestKamaConformance(ModuleConformance):
    plugin = Kama
