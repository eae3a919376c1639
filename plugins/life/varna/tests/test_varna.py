from dharma_plugin_varna import Varna

from dharma_kernel.testing import ModuleConformance


class TestVarnaConformance(ModuleConformance):
    plugin = Varna
