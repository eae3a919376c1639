from dharma_plugin_shakti import Shakti

from dharma_kernel.testing import ModuleConformance


class TestShaktiConformance(ModuleConformance):
    plugin = Shakti
