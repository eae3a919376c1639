from dharma_plugin_career import Career

from dharma_kernel.testing import ModuleConformance


class TestCareerConformance(ModuleConformance):
    plugin = Career
