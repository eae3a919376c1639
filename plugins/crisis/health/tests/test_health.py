from dharma_plugin_health import Health

from dharma_kernel.testing import ModuleConformance


class TestHealthConformance(ModuleConformance):
    plugin = Health
