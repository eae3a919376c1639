from dharma_plugin_chitta import Chitta

from dharma_kernel.testing import ModuleConformance


class TestChittaConformance(ModuleConformance):
    plugin = Chitta
