from dharma_plugin_samkhya import Samkhya

from dharma_kernel.testing import ModuleConformance


class TestSamkhyaConformance(ModuleConformance):
    plugin = Samkhya
