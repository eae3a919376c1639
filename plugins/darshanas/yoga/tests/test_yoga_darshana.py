from dharma_plugin_yoga_darshana import YogaDarshana

from dharma_kernel.testing import ModuleConformance


class TestYogaDarshanaConformance(ModuleConformance):
    plugin = YogaDarshana
