from dharma_plugin_smarana import Smarana

from dharma_kernel.testing import ModuleConformance


class TestSmaranaConformance(ModuleConformance):
    plugin = Smarana
