from dharma_plugin_moksha import Moksha

from dharma_kernel.testing import ModuleConformance


class TestMokshaConformance(ModuleConformance):
    plugin = Moksha
