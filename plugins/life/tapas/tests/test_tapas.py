from dharma_plugin_tapas import Tapas

from dharma_kernel.testing import ModuleConformance


class TestTapasConformance(ModuleConformance):
    plugin = Tapas
