from dharma_plugin_grihastha import Grihastha

from dharma_kernel.testing import ModuleConformance


class TestGrihasthaConformance(ModuleConformance):
    plugin = Grihastha
