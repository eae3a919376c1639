from dharma_plugin_yoga import Yoga

from dharma_kernel.testing import ModuleConformance


class TestYogaConformance(ModuleConformance):
    plugin = Yoga
