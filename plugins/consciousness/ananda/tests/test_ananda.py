from dharma_plugin_ananda import Ananda

from dharma_kernel.testing import ModuleConformance


class TestAnandaConformance(ModuleConformance):
    plugin = Ananda
