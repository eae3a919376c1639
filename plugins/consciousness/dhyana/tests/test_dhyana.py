from dharma_plugin_dhyana import Dhyana

from dharma_kernel.testing import ModuleConformance


class TestDhyanaConformance(ModuleConformance):
    plugin = Dhyana
