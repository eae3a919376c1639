from dharma_plugin_wellness import Wellness

from dharma_kernel.testing import ModuleConformance


class TestWellnessConformance(ModuleConformance):
    plugin = Wellness
