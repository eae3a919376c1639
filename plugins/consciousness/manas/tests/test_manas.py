from dharma_plugin_manas import Manas

from dharma_kernel.testing import ModuleConformance


class TestManasConformance(ModuleConformance):
    plugin = Manas
