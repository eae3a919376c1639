from dharma_plugin_clarity import Clarity

from dharma_kernel.testing import ModuleConformance


class TestClarityConformance(ModuleConformance):
    plugin = Clarity
