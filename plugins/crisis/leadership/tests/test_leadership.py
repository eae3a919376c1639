from dharma_plugin_leadership import Leadership

from dharma_kernel.testing import ModuleConformance


class TestLeadershipConformance(ModuleConformance):
    plugin = Leadership
