from dharma_plugin_karma import Karma

from dharma_kernel.testing import ModuleConformance


class TestKarmaConformance(ModuleConformance):
    plugin = Karma
