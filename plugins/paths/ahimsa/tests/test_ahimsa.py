from dharma_plugin_ahimsa import Ahimsa

from dharma_kernel.testing import ModuleConformance


class TestAhimsaConformance(ModuleConformance):
    plugin = Ahimsa
