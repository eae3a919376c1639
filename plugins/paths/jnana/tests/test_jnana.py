from dharma_plugin_jnana import Jnana

from dharma_kernel.testing import ModuleConformance


class TestJnanaConformance(ModuleConformance):
    plugin = Jnana
