from dharma_plugin_mimamsa import Mimamsa

from dharma_kernel.testing import ModuleConformance


class TestMimamsaConformance(ModuleConformance):
    plugin = Mimamsa
