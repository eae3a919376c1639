from dharma_plugin_sankalpa import Sankalpa

from dharma_kernel.testing import ModuleConformance


class TestSankalpaConformance(ModuleConformance):
    plugin = Sankalpa
