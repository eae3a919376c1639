from dharma_plugin_ahamkara import Ahamkara

from dharma_kernel.testing import ModuleConformance


class TestAhamkaraConformance(ModuleConformance):
    plugin = Ahamkara
