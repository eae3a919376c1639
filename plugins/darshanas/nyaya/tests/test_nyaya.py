from dharma_plugin_nyaya import Nyaya

from dharma_kernel.testing import ModuleConformance


class TestNyayaConformance(ModuleConformance):
    plugin = Nyaya
